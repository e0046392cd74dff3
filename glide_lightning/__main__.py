"""``python -m glide_lightning fit|validate --config experiments/<name>.yaml`` (training, LightningCLI)
and ``python -m glide_lightning sample …`` (images from prompts)."""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "sample":
        from glide_lightning.evaluation.sample_cli import main as sample

        sample(sys.argv[2:])
        return
    from glide_lightning.cli import main as train

    train()


if __name__ == "__main__":
    main()
