"""``python -m glide_lightning fit|validate|sample|fid|sweep|compare|bench …``: the front door,
:mod:`glide_lightning.commands`."""

from glide_lightning.commands import main

if __name__ == "__main__":
    main()
