"""``python -m qkernels``: the build report (what this qkernels was built with, what of it runs here)."""
import argparse
import json

from .build_report import build_info, format_build_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qkernels",
        description="Print what this qkernels was built with (torch, CUDA, architectures) and what runs here.")
    parser.add_argument("--json", action="store_true", help="print qkernels.build_info() as JSON")
    args = parser.parse_args(argv)
    info = build_info()
    print(json.dumps(info, indent=1) if args.json else format_build_report(info))


if __name__ == "__main__":
    main()
