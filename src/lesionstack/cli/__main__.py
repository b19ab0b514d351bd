"""`python -m lesionstack.cli`: the same as the `lesionstack` command."""

from lesionstack.cli import main

if __name__ == "__main__":
    main()
