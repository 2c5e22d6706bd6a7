"""`python -m cryo_lightning ...` is the same as `cryol ...` (for containers without console scripts)."""

from cryo_lightning.cli import main

if __name__ == "__main__":
    main()
