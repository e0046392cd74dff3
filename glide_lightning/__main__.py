"""``python -m glide_lightning fit|validate --config experiments/<name>.yaml``."""

from glide_lightning.cli import main

if __name__ == "__main__":
    main()
