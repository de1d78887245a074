"""`python -m gan_vae`: the continual learner, gan_vae.continual (its docstring has the commands and the method).

    python -m gan_vae --config configs/gan_vae_shared_data.yaml
    python -m gan_vae --config configs/gan_vae_shared_data.yaml run.name=R run.resume=auto

The program runs as the module gan_vae.continual, imported by that name (`python -m gan_vae.continual` comes here
too), so a run.plugins file that imports gan_vae.continual (a config section, a registry entry) gets the module the
run uses.
"""
from common.cli import run_cli
from gan_vae.continual import main

if __name__ == "__main__":
    run_cli(main)
