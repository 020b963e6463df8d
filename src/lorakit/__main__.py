"""``python -m lorakit`` (as ``torchrun ... -m lorakit train CONFIG.yaml`` starts it): the CLI."""

from .cli.main import main

raise SystemExit(main())
