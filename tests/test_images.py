"""Real-world image data: odd modes are normalised, broken and unsafe files are dropped with their reason."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import finetune
from conftest import image, tiny_recipe
from finetune.data.images import BadMedia, load_image
from finetune.training.pipeline import load_processing, scanned
from finetune.recipe import RecipeError, load_recipe
from finetune.batching.scan import DataRefused

PIXEL_LIMIT = 50_000


def png_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def build_fuzz_set(tmp_path):
    """A VQA-style dataset (columns renamed, as real datasets have them) with one case per row."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    image(9).save(outside)

    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red: white after compositing
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    exif = Image.new("RGB", (60, 30), (0, 200, 0))
    tags = Image.Exif()
    tags[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    gray16 = Image.fromarray(np.linspace(1000, 60000, 40 * 40).reshape(40, 40).astype(np.uint16))
    good_png = png_bytes(image(1))
    files = {
        "good.png": good_png,
        "cmyk.jpg": png_bytes(image(2).convert("CMYK"), "JPEG"),
        "gray16.png": png_bytes(gray16),
        "gray.png": png_bytes(image(3).convert("L")),
        "rgba.png": png_bytes(rgba),
        "palette.png": png_bytes(palette, transparency=0),
        "exif.jpg": png_bytes(exif, "JPEG", exif=tags),
        "truncated.png": good_png[: len(good_png) // 2],
        "empty.png": b"",
        "text.png": b"this is not an image\n",
        "huge.png": png_bytes(Image.new("RGB", (300, 300), (1, 2, 3))),
        "truncated.jpg": png_bytes(image(4, (64, 64)), "JPEG")[:-1500],
    }
    for name, data in files.items():
        (root / "images" / name).write_bytes(data)
    os.symlink(outside, root / "images" / "link.png")
    paths = ["good.png", "cmyk.jpg", "gray16.png", "gray.png", "rgba.png", "palette.png", "exif.jpg",
             "truncated.png", "empty.png", "text.png", "missing.png", "huge.png", str(outside), "../../outside.png",
             "link.png", "https://example.com/a.png", "truncated.jpg"]
    with open(root / "train.jsonl", "w") as f:
        for i, path in enumerate(paths):
            picture = path if path.startswith(("/", "http")) else f"images/{path}"
            f.write(json.dumps({"picture": picture, "q": f"Question {i}?", "answers": [f"answer {i}"]}) + "\n")
    return root


EXPECTED_DROPS = {"truncated": [7, 16], "empty file": [8], "not an image": [9], "missing file": [10],
                  "too many pixels": [11], "outside image root": [12, 13, 14], "url refused": [15]}


def fuzz_recipe(root, tmp_path, **data):
    # finetune's own defaults for the keys left out, as these runs always had them
    return load_recipe(tiny_recipe(
        tmp_path / "run", without=["data.max_samples", "lora.dropout", "training.learning_rate",
                                   "training.activation_checkpointing", "training.seed"],
        data={"path": str(root), "format": "vqa", "columns": {"image": "picture", "question": "q"},
              "pixel_limit": PIXEL_LIMIT, **data},
        training={"max_steps": 1}))


DECODE_ONLY = {"truncated": [7, 16]}  # a good header in front of broken pixel data


@pytest.mark.parametrize("verify", ["decode", "header"])
def test_fuzzed_images_are_normalised_or_dropped_with_their_reason_and_training_proceeds(tmp_path, verify):
    root = build_fuzz_set(tmp_path)
    recipe = fuzz_recipe(root, tmp_path, verify_images=verify)
    _, family, _, collator = load_processing(recipe)
    data, report = scanned(recipe, "train", family, collator)
    if verify == "decode":
        assert report.dropped == EXPECTED_DROPS
        assert report.kept == [0, 1, 2, 3, 4, 5, 6] and report.rows == 17
    else:  # same fates, except the truncated files: they pass the header check and are dropped in training
        assert report.dropped == {k: v for k, v in EXPECTED_DROPS.items() if k not in DECODE_ONLY}
        assert report.kept == [0, 1, 2, 3, 4, 5, 6, 7, 16] and report.rows == 17
        assert all("truncated" in (data[i]["problem"] or "") for i in (7, 16))
        report.kept = [0, 1, 2, 3, 4, 5, 6]  # the checks below look at the good rows
    assert "row 12:" in report.examples["outside image root"] and "an absolute path outside the image root" in \
        report.examples["outside image root"]

    kept = {i: data[i]["images"][0] for i in report.kept}
    assert all(img.mode == "RGB" for img in kept.values())
    assert kept[4].getpixel((30, 20)) == (255, 255, 255) and kept[4].getpixel((5, 20)) == (0, 0, 255)
    assert kept[5].getpixel((0, 0)) == (255, 255, 255), "palette transparency composited on white"
    assert kept[6].size == (30, 60), "EXIF orientation applied"
    low, high = kept[2].getextrema()[0]
    assert (low, high) == (0, 255), "16-bit range scaled to 8 bits, not clipped"

    # Every row trains once (batch 2, 5 steps cover the 9 header-checked rows): the truncated ones are left out.
    out = finetune.train(recipe, overrides=["training.max_steps=5", "training.train_sampling_strategy=sequential"])
    summary = json.loads((out / "run_summary.json").read_text())
    train_data = summary["train_data"]
    assert summary["steps"] == 5
    if verify == "decode":
        assert train_data["kept"] == 7 and train_data["dropped_in_training"] == {}
        assert {k: v["row_ids"] for k, v in train_data["dropped"].items()} == EXPECTED_DROPS
        assert train_data["images_per_row"] == {"1": 7}
    else:
        assert train_data["kept"] == 9
        rows = train_data["dropped_in_training"]["rows"]
        assert {k: (v["count"], v["row_ids"]) for k, v in rows.items()} == {"truncated": (2, [7, 16])}
        assert rows["truncated"]["example"].startswith("row 7: images/truncated.png")
        # In order, batches of 2: [0 1] [2 3] [4 5] [6 7] [16]; the last one has no good row, so every rank skips
        # it (a stand-in with nothing labelled), and the 7 good rows are the samples trained.
        assert train_data["dropped_in_training"]["skipped_batches"] == 1
        assert summary["throughput"]["samples"] == 7


@pytest.mark.parametrize("verify", ["decode", "header"])
def test_bad_images_can_fail_fast_with_a_summary(tmp_path, verify):
    root = build_fuzz_set(tmp_path)
    recipe = fuzz_recipe(root, tmp_path, on_bad_image="error", verify_images=verify)
    with pytest.raises(DataRefused) as e:
        finetune.train(recipe)
    message = str(e.value)
    assert message.startswith(f"{10 if verify == 'decode' else 8} rows have images, videos or fields that cannot")
    assert "outside image root: 3 rows (ids [12, 13, 14])" in message
    assert ("truncated: 2 rows (ids [7, 16])" in message) == (verify == "decode")
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_path_escapes_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.png"
    image(0).save(secret)
    os.symlink(secret, root / "innocent.png")
    os.symlink(tmp_path, root / "up")
    for path in (str(secret), "../secret.png", "innocent.png", "up/secret.png", "./../root/../secret.png",
                 "file:///etc/passwd", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(BadMedia) as e:
            load_image(path, root)
        assert e.value.reason in ("outside image root", "url refused"), path
    assert load_image({"path": "innocent.png"}, root, allow_external=True).size == (64, 64)
    assert load_image(str(secret), root, allow_external=True).size == (64, 64)
    image(1).save(root / "fine.png")
    assert load_image("./fine.png", root).size == (64, 64)


def test_max_pixels_downscales_and_unknown_settings_are_named(tmp_path):
    root = tmp_path
    Image.new("RGB", (400, 100)).save(root / "wide.png")
    small = load_image("wide.png", root, max_pixels=10_000)
    assert small.size == (200, 50)
    with pytest.raises(RecipeError, match=r"data.columns: unknown column of format vqa 'questoin' "
                                          r"\(did you mean 'question'\?\)"):
        load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"},
                     "data": {"path": "x", "format": "vqa", "columns": {"questoin": "q"}}})
    recipe = load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"},
                          "data": {"path": "x", "image_processor": {"max_pixelz": 100}}})
    with pytest.raises(RecipeError, match=r"data.image_processor.max_pixelz: not a setting of Qwen2VLImageProcessor"):
        load_processing(recipe)


def test_processor_image_settings_apply_and_are_saved_with_the_processor(tmp_path):
    from transformers import AutoProcessor

    recipe = load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"},
                          "data": {"path": "x", "image_processor": {"max_pixels": 6272}}})
    _, _, processor, _ = load_processing(recipe)
    prompt = ["<|vision_start|><|image_pad|><|vision_end|>"]
    big = [Image.new("RGB", (448, 448))]
    assert processor(text=prompt, images=big)["image_grid_thw"].tolist() == [[1, 4, 4]]  # default: [1, 8, 8]
    processor.save_pretrained(tmp_path)  # what a run folder and a merged export hold
    assert AutoProcessor.from_pretrained(tmp_path)(text=prompt, images=big)["image_grid_thw"].tolist() == [[1, 4, 4]]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grayscale) with no pixel data: huge sizes cost nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_pixel_limit_above_pillows_own_limit_is_honoured_and_named(tmp_path):
    """Regression: Pillow refused images over ~179M pixels (2x its MAX_IMAGE_PIXELS) before data.pixel_limit was
    read, so a higher recipe limit had no effect and the drop reason named Pillow's limit."""
    from finetune.data.images import image_size

    (tmp_path / "huge.png").write_bytes(png_header_only(15_000, 15_000))  # 225M pixels, over Pillow's 178.9M
    assert 15_000 * 15_000 > 2 * Image.MAX_IMAGE_PIXELS
    pillow_default = Image.MAX_IMAGE_PIXELS
    assert image_size("huge.png", tmp_path, pixel_limit=250_000_000) == (15_000, 15_000)
    assert Image.MAX_IMAGE_PIXELS == pillow_default  # Pillow's global is restored
    # At the default limit (Pillow's own value) Pillow's guard refuses it first: the reason names the recipe key.
    with pytest.raises(BadMedia, match=r"huge.png: over data.pixel_limit=89478485 pixels") as e:
        image_size("huge.png", tmp_path)
    assert e.value.reason == "too many pixels"
    with pytest.raises(BadMedia, match=r"15000x15000 is over data.pixel_limit=220000000"):
        image_size("huge.png", tmp_path, pixel_limit=220_000_000)  # between 1x and 2x: finetune's check
    assert Image.MAX_IMAGE_PIXELS == pillow_default
