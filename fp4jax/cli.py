"""The `fp4jax` command."""

import argparse

from fp4jax import demo


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="fp4jax", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("demo", help="run the end-to-end demo (make demo)")
  args, rest = parser.parse_known_args(argv)
  if args.command == "demo":
    demo.main(rest)


if __name__ == "__main__":
  main()
