"""`python -m pipeline ...` is the `rlhf` command (also under `accelerate launch -m pipeline ...`)."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
