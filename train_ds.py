"""Entry point for DeepSpeed's launcher: `deepspeed [--num_gpus N | --hostfile H] train_ds.py --recipe R`.

Thin on purpose: the loop lives in launcher/train.py, the recipe schema in launcher/recipe.py."""

from launcher.train import main

if __name__ == "__main__":
    raise SystemExit(main())
