"""Continual teacher-student generative learning: WGAN-GP experts teach a beta-VAE student a sequence of domains.

    python -m gan_vae.continual --config configs/gan_vae_mnist_fashion.yaml
    python -m gan_vae.evaluate runs/<run>
"""
