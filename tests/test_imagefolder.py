"""The imagefolder source: decoding and rejecting single files, mode conversion, resize policies, the folder
layout (class order, nesting, hidden files), its errors, and the S3 branch through a stand-in for
resnet.data.s3."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet.data.imagefolder import Candidate, Layout, decode_layout, load_imagefolder, load_s3, s3_layout
from resnet.data.images import RESIZE_POLICIES, RejectedImage, decode_image, to_rgb
from resnet.data.sources import Rejected
from resnet.errors import DataError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(color=RED, size=(16, 16), mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, size, color))


def noise(size=(16, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def decode(data: bytes, size: int = 16, **options) -> np.ndarray:
    return decode_image(data, image_size=size, resize=options.pop("resize", "stretch"), **options)


def rejection(data: bytes, **options) -> RejectedImage:
    with pytest.raises(RejectedImage) as info:
        decode(data, **options)
    return info.value


# ---- rejected files ----


def test_each_rejection_reason():
    photo = encode(Image.fromarray(noise((64, 48))), "JPEG", quality=90)
    drawing = encode(Image.fromarray(noise((64, 48))), "PNG")

    assert rejection(b"").reason == "zero-byte"
    text = rejection(b"hello, this is not a picture\n")
    assert (text.reason, text.detail) == (
        "not an image",
        "no image format recognised; the file starts with b'hello, this is n'",
    )
    assert rejection(photo[: len(photo) // 2]).reason == "truncated"
    assert rejection(drawing[: len(drawing) // 2]).reason == "truncated"
    tiny = rejection(solid(size=(4, 4)), min_size=8)
    assert (tiny.reason, tiny.detail) == ("too small", "4x4 pixels, a side is below min_size 8")
    assert rejection(solid(size=(4, 20)), min_size=8).reason == "too small"  # one side is enough
    assert decode(solid(size=(4, 4)), min_size=4).shape == (16, 16, 3)
    # Damaged compressed data reads as cut short ("broken data stream"): Pillow cannot tell the two apart.
    damaged = bytearray(drawing)
    start = damaged.find(b"IDAT") + 104
    damaged[start : start + 50] = bytes(50)
    broken = rejection(bytes(damaged))
    assert (broken.reason, broken.detail) == ("truncated", "broken data stream when reading image file")


def test_decompression_bomb_is_unreadable(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses more than twice this: 16×16 = 256
    bomb = rejection(solid(size=(16, 16)))
    assert bomb.reason == "unreadable" and "decompression bomb" in bomb.detail.lower()


def test_rejection_details_are_one_line_and_repeatable():
    data = b"\x00\x01garbage\nwith a newline"
    first, second = rejection(data), rejection(data)
    assert first.detail == second.detail and "\n" not in first.detail and "0x" not in first.detail


# ---- modes → RGB ----


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    """The decoded row 0, through a file where the mode survives one, else through to_rgb."""
    array = np.asarray(to_rgb(image))
    assert array.dtype == np.uint8 and array.shape[2] == 3
    return [tuple(int(v) for v in p) for p in array[0]]


def test_gray_and_bilevel():
    gray = Image.new("L", (2, 1))
    gray.putdata([0, 77])
    assert pixels(gray) == [(0, 0, 0), (77, 77, 77)]
    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    assert pixels(bilevel) == [BLACK, WHITE]
    # and through a file, as a folder would give them
    assert decode(encode(gray.resize((16, 16), Image.Resampling.NEAREST)))[0, 15].tolist() == [77, 77, 77]


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    assert pixels(rgba) == [WHITE, (10, 20, 30), (127, 127, 127)]
    la = Image.new("LA", (2, 1))
    la.putdata([(100, 0), (100, 255)])
    assert pixels(la) == [WHITE, (100, 100, 100)]
    # from a PNG file, whose transparent pixels hide a colour that must not show
    big = Image.new("RGBA", (16, 16), (200, 0, 0, 0))
    big.paste((0, 0, 200, 255), (0, 8, 16, 16))
    decoded = decode(encode(big))
    assert decoded[:8].reshape(-1, 3).tolist() == [list(WHITE)] * 128
    assert decoded[8:].reshape(-1, 3).tolist() == [[0, 0, 200]] * 128


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56, 200, 100, 50] + [0] * (3 * 253))
    palette.paste(2, (0, 0, 16, 8))
    plain = decode(encode(palette))
    assert plain[0, 0].tolist() == [200, 100, 50] and plain[15, 15].tolist() == [12, 34, 56]
    see_through = decode(encode(palette, transparency=2))  # palette entry 2 is transparent
    assert see_through[0, 0].tolist() == list(WHITE) and see_through[15, 15].tolist() == [12, 34, 56]
    gif = decode(encode(palette, "GIF", transparency=2))
    assert gif[0, 0].tolist() == list(WHITE) and gif[15, 15].tolist() == [12, 34, 56]


def test_cmyk_ycbcr_lab_hsv():
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0), (0, 255, 0, 0)])
    assert pixels(cmyk) == [WHITE, BLACK, (0, 255, 255), (255, 0, 255)]
    assert decode(encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "TIFF"))[3, 3].tolist() == [255, 0, 255]
    assert pixels(Image.new("YCbCr", (1, 1), (255, 128, 128))) == [WHITE]
    assert pixels(Image.new("YCbCr", (1, 1), (0, 128, 128))) == [BLACK]
    assert pixels(Image.new("HSV", (1, 1), (0, 255, 255))) == [RED]
    assert pixels(Image.new("HSV", (1, 1), (85, 255, 255))) == [GREEN]
    lab = Image.frombytes("LAB", (2, 1), bytes([255, 0, 0, 0, 0, 0]))  # L, a, b: white and black
    white, black = pixels(lab)
    assert all(v >= 253 for v in white) and all(v <= 2 for v in black)


def test_16_bit_gray_spans_the_full_range():
    values = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    png = Image.fromarray(values)
    decoded = np.asarray(to_rgb(Image.open(io.BytesIO(encode(png)))))
    assert Image.open(io.BytesIO(encode(png))).mode == "I;16"
    assert decoded[0, :, 0].tolist() == [255, 128, 0, 1]  # not Pillow's convert, which clips at 255
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 0] == decoded[..., 2]).all()
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([65535, 32768], dtype=">u2").tobytes())
    assert pixels(big_endian) == [WHITE, (128, 128, 128)]
    # A 16-bit PGM opens as 32-bit "I" holding 0..65535: the same scale.
    pgm = b"P5\n16 1\n65535\n" + np.array([65535, 32768] + [0] * 14, dtype=">u2").tobytes()
    assert decode(pgm, min_size=1)[0, :2, 0].tolist() == [255, 128]


def test_32_bit_int_and_float_gray():
    ints = Image.new("I", (3, 1))
    ints.putdata([-255, 0, 255])  # outside 0..65535: stretched from its own min..max
    assert [p[0] for p in pixels(ints)] == [0, 128, 255]
    unit = Image.new("F", (3, 1))
    unit.putdata([0.0, 0.5, 1.0])  # a float image in 0..1: normalised intensity
    assert [p[0] for p in pixels(unit)] == [0, 128, 255]
    wide = Image.new("F", (3, 1))
    wide.putdata([-2.0, 0.0, 2.0])
    assert [p[0] for p in pixels(wide)] == [0, 128, 255]
    tiff = decode(encode(unit.resize((16, 16), Image.Resampling.NEAREST), "TIFF"))
    assert tiff[0, 0, 0] == 0 and tiff[0, 15, 0] == 255


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (32, 16), RED)
    stored.paste(BLUE, (16, 0, 32, 16))  # left red, right blue, as the sensor stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored left edge becomes the top
    upright = decode(encode(stored, exif=exif), size=32, resize="pad")
    assert upright.shape == (32, 32, 3)
    assert (upright[:, :8] == 0).all() and (upright[:, 24:] == 0).all()  # now tall: bars left and right
    assert (upright[:16, 8:24] == RED).all() and (upright[16:, 8:24] == BLUE).all()
    # without the tag, the same pixels stay wide
    assert (decode(encode(stored), size=32, resize="pad")[:8] == 0).all()


# ---- resize policies ----


def bands() -> bytes:
    """64 wide × 32 tall: green columns 0..11, red 12..51, blue 52..63."""
    image = Image.new("RGB", (64, 32), RED)
    image.paste(GREEN, (0, 0, 12, 32))
    image.paste(BLUE, (52, 0, 64, 32))
    return encode(image)


def test_stretch_keeps_all_content_and_distorts():
    out = decode(bands(), resize="stretch")
    assert out.shape == (16, 16, 3)
    assert (out[:, 0] == GREEN).all() and (out[:, 15] == BLUE).all() and (out[:, 5:11] == RED).all()


def test_center_crop_is_torchvision_resize_then_center_crop():
    # Resize(16): 64×32 → 32×16; CenterCrop(16): columns 8..23 of that, i.e. source columns 16..47: all red.
    out = decode(bands(), resize="center_crop")
    assert out.shape == (16, 16, 3) and (out == RED).all()
    tall = decode(encode(Image.fromarray(noise((20, 50)))), resize="center_crop")
    assert tall.shape == (16, 16, 3)


def test_center_crop_offsets_match_torchvision_arithmetic():
    # 17×16 (w×h), size 16: no resize (shorter side already 16); torchvision crops left = round(1 / 2) = 0.
    source = noise((17, 16), seed=3)
    out = decode(encode(Image.fromarray(source)), resize="center_crop")
    assert np.array_equal(out, source[:, 0:16])
    source = noise((19, 16), seed=4)  # left = round(3 / 2) = 2
    assert np.array_equal(decode(encode(Image.fromarray(source)), resize="center_crop"), source[:, 2:18])


def test_pad_letterboxes_with_black_bars():
    wide = decode(encode(Image.new("RGB", (64, 32), WHITE)), resize="pad")
    assert wide.shape == (16, 16, 3)
    assert (wide[:4] == 0).all() and (wide[12:] == 0).all() and (wide[4:12] == 255).all()  # 16×8, centred
    tall = decode(encode(Image.new("RGB", (30, 60), WHITE)), resize="pad")
    assert (tall[:, :4] == 0).all() and (tall[:, 12:] == 0).all() and (tall[:, 4:12] == 255).all()


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_an_image_of_the_right_size_is_not_resampled(policy):
    source = noise((16, 16), seed=1)
    assert np.array_equal(decode(encode(Image.fromarray(source)), resize=policy), source)


def test_unknown_resize_policy():
    with pytest.raises(ValueError, match="expected one of stretch, center_crop, pad"):
        decode(solid(), resize="squash")
    with pytest.raises(DataError, match="expected one of"):
        load_imagefolder(16, path="/nonexistent", resize="squash")


# ---- folders ----


def color_png(value: int) -> bytes:
    return solid((value, value, value))


def test_classes_labels_nesting_and_hidden_files(tmp_path):
    root = write_tree(
        tmp_path / "data",
        {
            "b/one.png": color_png(30),
            "a/z.png": color_png(11),
            "a/sub/deep/x.png": color_png(12),  # nested below the class, found like torchvision does
            "a/m.png": color_png(10),
            "C/upper.png": color_png(50),  # sorted by code point: "C" < "a" < "a_b" < "b"
            "a_b/q.png": color_png(40),
            "a/.DS_Store": b"\x00\x01junk",  # hidden: skipped, not rejected
            "a/.thumbs/t.png": b"not read",
            ".ipynb_checkpoints/n.png": color_png(99),  # hidden directory: not a class
            "README.txt": b"files directly under the root belong to no class",
        },
    )
    data = load_imagefolder(8, path=str(root))
    assert data.classes == ("C", "a", "a_b", "b")
    assert data.labels.tolist() == [0, 1, 1, 1, 2, 3]
    # (class, relative path): a/m.png, a/sub/deep/x.png, a/z.png
    assert data.images[:, 0, 0, 0].tolist() == [50, 10, 12, 11, 40, 30]
    assert (
        data.images.shape == (6, 8, 8, 3) and data.images.dtype == np.uint8 and data.labels.dtype == np.int64
    )
    assert data.rejected == ()


def test_rejected_files_are_listed_sorted_and_the_rest_loads(tmp_path):
    photo = encode(Image.fromarray(noise((40, 40))), "JPEG")
    drawing = encode(Image.fromarray(noise((40, 40))))
    root = write_tree(
        tmp_path,
        {
            "cats/good.png": solid(RED),
            "cats/empty.jpg": b"",
            "cats/notes.jpg": b"this is text, renamed",
            "cats/cut.jpg": photo[: len(photo) // 2],
            "dogs/good.png": solid(BLUE),
            "dogs/cut.png": drawing[: len(drawing) // 2],
            "dogs/tiny.png": solid(size=(4, 4)),
        },
    )
    data = load_imagefolder(8, path=str(root))
    assert [(r.file, r.reason) for r in data.rejected] == [
        ("cats/cut.jpg", "truncated"),
        ("cats/empty.jpg", "zero-byte"),
        ("cats/notes.jpg", "not an image"),
        ("dogs/cut.png", "truncated"),
        ("dogs/tiny.png", "too small"),
    ]
    assert data.labels.tolist() == [0, 1]
    assert data.images[0, 4, 4].tolist() == list(RED) and data.images[1, 4, 4].tolist() == list(BLUE)
    assert all("\n" not in r.detail for r in data.rejected)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    root = write_tree(tmp_path, {"cats/a.png": solid(), "cats/locked.png": solid(), "dogs/b.png": solid()})
    (root / "cats/locked.png").chmod(0)
    try:
        data = load_imagefolder(8, path=str(root))
    finally:
        (root / "cats/locked.png").chmod(0o644)
    assert data.rejected == (Rejected("cats/locked.png", "unreadable", "cannot read: Permission denied"),)
    assert len(data.images) == 2


def test_a_read_error_is_rejected_not_raised(tmp_path):
    """What a permission error (or an S3 download failure) does, through the reader seam: runs as root too."""
    root = write_tree(tmp_path, {"cats/a.png": solid(), "cats/locked.png": solid(), "dogs/b.png": solid()})
    files = [
        Candidate(rel.split("/")[0], rel, rel, str(root / rel), 1)
        for rel in ("cats/a.png", "cats/locked.png", "dogs/b.png")
    ]

    def reader(candidates):
        for file in candidates:
            if file.name == "cats/locked.png":
                yield file, PermissionError(13, "Permission denied")
            else:
                yield file, Path(file.location).read_bytes()

    layout = Layout(root=str(root), classes=["cats", "dogs"], files=files)
    data = decode_layout(layout, reader, image_size=8, resize="stretch", min_size=8, desc="test")
    assert data.rejected == (Rejected("cats/locked.png", "unreadable", "cannot read: Permission denied"),)
    assert data.labels.tolist() == [0, 1]


def test_loading_is_deterministic(tmp_path):
    files = {
        f"{cls}/{i}.png": encode(Image.fromarray(noise((20 + i, 30), seed=i)))
        for cls in "xy"
        for i in range(4)
    }
    files["x/bad.png"] = b"nope"
    root = write_tree(tmp_path, files)
    first = load_imagefolder(12, path=str(root), resize="pad")
    second = load_imagefolder(12, path=str(root), resize="pad")
    assert first.images.tobytes() == second.images.tobytes()
    assert first.labels.tolist() == second.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert first.rejected == second.rejected


# ---- folder errors ----


def data_error(path, **options) -> str:
    with pytest.raises(DataError) as info:
        load_imagefolder(8, path=str(path), **options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path_and_file_path(tmp_path):
    assert (
        data_error(tmp_path / "nope")
        == f"{tmp_path / 'nope'}: no such directory (expected ROOT/CLASS/IMAGE files)"
    )
    (tmp_path / "file.zip").write_bytes(b"zip")
    message = data_error(tmp_path / "file.zip")
    assert message == f"{tmp_path / 'file.zip'}: is a file, not a directory (expected ROOT/CLASS/IMAGE files)"


def test_no_class_directories(tmp_path):
    root = write_tree(tmp_path / "cats", {"a.png": solid(), "b.png": solid()})  # images, but no class dirs
    assert data_error(root) == f"{root}: no class directories (expected ROOT/CLASS/IMAGE files)"


def test_one_class_is_not_enough(tmp_path):
    root = write_tree(tmp_path / "raw", {"cats/a.png": solid()})
    assert data_error(root) == f"{root}: found 1 class (cats); a classifier needs at least 2"


def test_empty_class_directory(tmp_path):
    root = write_tree(tmp_path / "raw", {"cats/a.png": solid(), "dogs/.keep": b""})  # only a hidden file
    (root / "eels").mkdir()
    assert data_error(root) == f"{root / 'dogs'}: empty class directory (expected image files)"
    (root / "dogs/.keep").unlink()
    (root / "dogs/x.png").write_bytes(solid())
    assert data_error(root) == f"{root / 'eels'}: empty class directory (expected image files)"


def test_a_class_with_no_usable_image(tmp_path):
    photo = encode(Image.fromarray(noise((40, 40))), "JPEG")
    cut = photo[: len(photo) // 2]
    root = write_tree(tmp_path / "raw", {"cats/a.png": solid(), **{f"dogs/{i}.jpg": cut for i in range(3)}})
    assert data_error(root) == f"{root / 'dogs'}: none of its 3 files is a usable image (3 truncated)"
    (root / "dogs/2.jpg").write_bytes(b"text")
    assert (
        data_error(root)
        == f"{root / 'dogs'}: none of its 3 files is a usable image (2 truncated, 1 not an image)"
    )
    for i in (1, 2):
        (root / f"dogs/{i}.jpg").unlink()
    assert data_error(root) == f"{root / 'dogs'}: its only file is not a usable image (1 truncated)"


# ---- S3, through a stand-in for resnet.data.s3 ----


class FakeS3:
    """resnet.data.s3's API over a local directory that stands for the bucket "bucket"."""

    def __init__(self, directory: Path, fail: dict[str, Exception] | None = None):
        self.directory, self.fail, self.requested = directory, fail or {}, []

    @staticmethod
    def split_s3_uri(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return bucket, key

    def list_objects(self, uri: str) -> list[tuple[str, int]]:
        bucket, prefix = self.split_s3_uri(uri)
        assert bucket == "bucket"
        found = [
            (p.relative_to(self.directory).as_posix(), p.stat().st_size) for p in self.directory.rglob("*")
        ]
        marker = [
            (p.relative_to(self.directory).as_posix() + "/", 0)
            for p in self.directory.rglob("*")
            if p.is_dir()
        ]
        return sorted(
            o for o in found + marker if o[0].startswith(prefix) and not (self.directory / o[0]).is_dir()
        )

    def read_objects(self, bucket: str, keys, *, workers: int = 16):
        assert bucket == "bucket" and workers == 3
        self.requested.extend(keys)
        for key in keys:
            yield key, self.fail.get(key) or (self.directory / key).read_bytes()


def test_s3_keys_map_to_classes():
    objects = [
        ("data/cats/a.png", 10),
        ("data/cats/sub/b.png", 5),
        ("data/readme.txt", 3),  # directly under the prefix: no class
        ("data/dogs/", 0),  # a directory marker
        ("data/dogs/c.png", 0),
        ("data/.hidden/x.png", 1),  # hidden class directory
        ("data/cats/.DS_Store", 4),  # hidden file
        ("data/cats/.cache/d.png", 4),  # inside a hidden directory
        ("data2/eels/e.png", 7),  # a sibling prefix that a raw prefix listing would include
        ("data/eels/.keep", 1),  # a class of hidden files only: a class, empty
    ]
    layout = s3_layout("s3://bucket/data", "bucket", "data/", objects)
    assert layout.classes == ["cats", "dogs", "eels"]
    assert layout.files == [
        Candidate("cats", "cats/a.png", "s3://bucket/data/cats/a.png", "data/cats/a.png", 10),
        Candidate("cats", "cats/sub/b.png", "s3://bucket/data/cats/sub/b.png", "data/cats/sub/b.png", 5),
        Candidate("dogs", "dogs/c.png", "s3://bucket/data/dogs/c.png", "data/dogs/c.png", 0),
    ]
    assert layout.class_path("eels") == "s3://bucket/data/eels"
    at_the_root = s3_layout("s3://bucket", "bucket", "", [("cats/a.png", 1), ("top.png", 1)])
    assert at_the_root.classes == ["cats"] and at_the_root.files[0].name == "s3://bucket/cats/a.png"


def test_s3_branch_matches_the_local_load(tmp_path):
    bucket = tmp_path / "bucket"
    write_tree(
        bucket,
        {
            "data/cats/b.png": color_png(20),
            "data/cats/a/x.png": color_png(10),
            "data/cats/empty.png": b"",
            "data/dogs/c.png": color_png(30),
            "data/dogs/lost.png": color_png(40),
            "data/dogs/text.png": b"text",
            "data/root.png": color_png(1),
            "data-other/cats/z.png": color_png(50),
        },
    )
    fake = FakeS3(
        bucket,
        fail={
            "data/dogs/lost.png": DataError("s3://bucket/data/dogs/lost.png: reset by\npeer after 3 tries")
        },
    )
    data = load_s3("s3://bucket/data/", 8, resize="center_crop", min_size=8, workers=3, api=fake)
    assert data.classes == ("cats", "dogs")
    assert data.labels.tolist() == [0, 0, 1] and data.images[:, 0, 0, 0].tolist() == [10, 20, 30]
    assert data.rejected == (
        Rejected("s3://bucket/data/cats/empty.png", "zero-byte", "the file is empty"),
        Rejected("s3://bucket/data/dogs/lost.png", "unreadable", "cannot read: reset by peer after 3 tries"),
        Rejected(
            "s3://bucket/data/dogs/text.png",
            "not an image",
            "no image format recognised; the file starts with b'text'",
        ),
    )
    # downloaded in (class, path) order, the empty object never
    assert fake.requested == [
        "data/cats/a/x.png",
        "data/cats/b.png",
        "data/dogs/c.png",
        "data/dogs/lost.png",
        "data/dogs/text.png",
    ]

    (bucket / "data/dogs/lost.png").write_bytes(b"text")  # the local load of the same tree, minus the failure
    local = load_imagefolder(8, path=str(bucket / "data"))
    assert local.images.tobytes() == data.images.tobytes() and local.classes == data.classes


def test_s3_errors_name_the_uri(tmp_path):
    bucket = write_tree(tmp_path / "bucket", {"data/cats/a.png": solid(), "data/dogs/b.png": b"text"})
    with pytest.raises(DataError, match=r"^s3://bucket/nothing: no objects under this prefix"):
        load_s3("s3://bucket/nothing", 8, resize="pad", min_size=8, workers=3, api=FakeS3(bucket))
    with pytest.raises(
        DataError, match=r"^s3://bucket/data/dogs: its only file is not a usable image \(1 not an image\)$"
    ):
        load_s3("s3://bucket/data", 8, resize="pad", min_size=8, workers=3, api=FakeS3(bucket))
    (bucket / "data/dogs/b.png").unlink()
    with pytest.raises(
        DataError, match=r"^s3://bucket/data: found 1 class \(cats\); a classifier needs at least 2$"
    ):
        load_s3("s3://bucket/data", 8, resize="pad", min_size=8, workers=3, api=FakeS3(bucket))


def test_symbolic_links_are_followed_but_a_loop_ends(tmp_path):
    root = write_tree(tmp_path / "raw", {"cats/a.png": solid(RED), "dogs/b.png": solid(BLUE)})
    (root / "cats/loop").symlink_to(root / "cats")  # would walk forever
    (root / "dogs/cats-too").symlink_to(root / "cats")  # followed, as torchvision does
    (root / "dogs/broken.png").symlink_to(root / "missing.png")
    data = load_imagefolder(8, path=str(root))
    assert data.labels.tolist() == [0, 1, 1]
    assert data.images[:, 0, 0].tolist() == [
        list(RED),
        list(BLUE),
        list(RED),
    ]  # dogs/b.png, dogs/cats-too/a.png
    assert data.rejected == (
        Rejected("dogs/broken.png", "unreadable", "cannot read: No such file or directory"),
    )
