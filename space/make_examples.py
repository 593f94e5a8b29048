"""Write the page's example images: a few held-out test images of the shapes task, named by their true caption.

    python space/make_examples.py            # rewrites space/examples/*.png

The images come from the shapes generator (`mqwen.demo.shapes`), so they are exactly what the demo model is
evaluated on; they are committed so that the page (and a Space) shows them without running the generator.
The file name is the true caption, which the page shows as the example's label.
"""

import argparse
from pathlib import Path

from mqwen.demo.shapes import make_example

OUT = Path(__file__).resolve().parent / "examples"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=6, help="how many test-split images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="the training image size (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    for index in range(args.count):
        example = make_example("test", index, image_size=args.image_size)
        name = f"{index:02d}_{example.caption.replace(' ', '_')}.png"
        example.image.save(args.out / name, optimize=True)
        print(args.out / name)


if __name__ == "__main__":
    main()
