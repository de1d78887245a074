"""Continual teacher-student generative learning: WGAN-GP experts teach a beta-VAE student a sequence of domains.

    python -m gan_vae --config configs/gan_vae_mnist_fashion.yaml        # or python -m gan_vae.continual
    python -m gan_vae.evaluate runs/<run>

continual (config, resume checks, the task loop), experts (teacher phase), student (student phase), losses (the
student's loss terms: a registry), evaluation (FID matrices, forgetting), fid, tasks, forgetting.
"""
