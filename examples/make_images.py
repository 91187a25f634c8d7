"""Draw the example images in examples/images/ (synthetic scenes, no downloads).

Run: python examples/make_images.py
"""
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).with_name("images")


def scene(size, background, shapes):
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    for kind, box, colour in shapes:
        getattr(draw, kind)(box, fill=colour)
    return im


def main():
    OUT.mkdir(exist_ok=True)
    scene((640, 480), (135, 190, 235), [("rectangle", (0, 330, 640, 480), (90, 160, 70)),
                                        ("ellipse", (480, 40, 580, 140), (250, 220, 60)),
                                        ("rectangle", (120, 220, 300, 360), (170, 60, 50)),
                                        ("polygon", [(110, 220), (210, 140), (310, 220)], (120, 40, 40))]
          ).save(OUT / "house.jpg", quality=92)
    scene((400, 600), (245, 245, 240), [("ellipse", (60, 60, 340, 340), (220, 80, 40)),
                                        ("rectangle", (150, 380, 250, 560), (40, 90, 200))]
          ).save(OUT / "portrait.png")
    scene((512, 512), (30, 30, 30), [("rectangle", (32 + 64 * i, 32 + 64 * j, 80 + 64 * i, 80 + 64 * j),
                                      ((37 * i) % 255, (91 * j) % 255, 200)) for i in range(7) for j in range(7)]
          ).save(OUT / "grid.png")
    scene((300, 200), (200, 230, 200), [("ellipse", (20, 20, 120, 180), (60, 60, 160)),
                                        ("ellipse", (180, 60, 280, 140), (160, 60, 60))]
          ).convert("L").save(OUT / "gray.png")


if __name__ == "__main__":
    main()
