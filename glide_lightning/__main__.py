"""``python -m glide_lightning fit|validate --config experiments/<name>.yaml`` (training, LightningCLI)
``python -m glide_lightning sample …`` (images from prompts) and ``… fid|sweep …`` (zero-shot FID)."""

import sys


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "sample":
        from glide_lightning.evaluation.sample_cli import main as sample

        sample(sys.argv[2:])
        return
    if command in ("fid", "sweep"):
        from glide_lightning.evaluation.fid_cli import main as fid

        fid(command, sys.argv[2:])
        return
    if command == "compare":
        from glide_lightning.evaluation.report import main as compare

        compare(sys.argv[2:])
        return
    from glide_lightning.cli import main as train

    train()


if __name__ == "__main__":
    main()
