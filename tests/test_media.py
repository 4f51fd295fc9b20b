"""Multi-image LLaVA conversations and videos (decoded with PyAV) train on the zoo's Qwen2-VL."""

import json

import av
import numpy as np
import torch

import finetune
from conftest import image, tiny_recipe
from finetune.batching.collate import IGNORE_INDEX
from finetune.data.rows import chat_dataset
from finetune.data.images import load_video
from finetune.training.pipeline import load_processing, scanned
from finetune.recipe import load_recipe


def write_video(path, frames=12, size=(64, 48), fps=6):
    """Frame i is a flat colour with red = 20 * i, so temporal order can be read back."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            array = np.full((size[1], size[0], 3), (20 * i, 100, 50), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def media_recipe(path, fmt, tmp_path, **data):
    # finetune's own defaults for the keys left out, as these runs always had them
    return load_recipe(tiny_recipe(
        tmp_path / f"run-{fmt}", without=["data.max_samples", "lora.dropout", "training.learning_rate",
                                          "training.activation_checkpointing", "training.seed"],
        data={"path": str(path), "format": fmt, **data}, training={"max_steps": 1, "per_device_train_batch_size": 3}))


def test_video_frames_are_sampled_uniformly_in_temporal_order(tmp_path):
    write_video(tmp_path / "clip.mp4")
    frames = load_video("clip.mp4", tmp_path, frames=4, fps=None)
    reds = [f.getpixel((10, 10))[0] for f in frames]
    # 12 frames, 4 wanted: indices 1, 4, 7, 10 (centred in their thirds), red = 20 * index (+- codec error).
    assert all(abs(r - 20 * i) <= 6 for r, i in zip(reds, (1, 4, 7, 10))), reds
    assert len(load_video("clip.mp4", tmp_path, frames=None, fps=2.0)) == 4  # 2 s at 2 fps
    assert len(load_video("clip.mp4", tmp_path, frames=3, fps=5.0)) == 3  # fps, capped by the frame count


def test_multi_image_llava_conversations_train_a_step(tmp_path):
    for i in range(4):
        image(i).save(tmp_path / f"{i}.png")
    rows = [
        {"id": "a", "image": ["0.png", "1.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Same size."}]},
        {"id": "b", "image": "2.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "c", "image": ["3.png", "0.png"], "conversations": [
            {"from": "human", "value": "First <image> then <image> what?"}, {"from": "gpt", "value": "Both."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    recipe = media_recipe(tmp_path / "llava.json", "llava", tmp_path)
    _, family, processor, collator = load_processing(recipe)
    data, report = scanned(recipe, "train", family, collator)
    assert report.kept == [0, 1, 2] and report.images_per_row == {0: 2, 1: 1, 2: 2}
    batch = collator([data[i] for i in range(3)])
    assert batch["image_grid_thw"].shape[0] == 5, "five images, in placeholder order"
    supervised = [processor.tokenizer.decode(ids[labels != IGNORE_INDEX]) for ids, labels in
                  zip(batch["input_ids"], batch["labels"])]
    assert supervised == ["Same size.<|im_end|>", "Noise.<|im_end|>Yes.<|im_end|>", "Both.<|im_end|>"]

    out = finetune.train(recipe)
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 1


def test_videos_train_a_step_as_qwen_video_input_and_become_frames_elsewhere(tmp_path):
    write_video(tmp_path / "clip.mp4")
    for i in range(6):
        image(i, (32, 32)).save(tmp_path / f"f{i}.png")
    rows = [{"video": "clip.mp4", "question": "What changes?", "answer": "It gets redder."},
            {"frames": [f"f{i}.png" for i in range(6)], "question": "What is shown?", "answer": "Noise."},
            {"video": "clip.mp4", "question": "How long?", "answer": "Two seconds."}]
    (tmp_path / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = media_recipe(tmp_path / "videos.jsonl", "video", tmp_path, video_frames=4)
    _, family, processor, collator = load_processing(recipe)
    assert family.video_input
    data, report = scanned(recipe, "train", family, collator)
    assert report.kept == [0, 1, 2]
    batch = collator([data[i] for i in range(3)])
    # Qwen2-VL packs 2 frames per temporal patch: 4 frames -> t = 2 for each of the three videos.
    assert batch["video_grid_thw"][:, 0].tolist() == [2, 2, 2] and "pixel_values" not in batch
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert (batch["input_ids"] == video_pad).sum() > 0
    assert not (batch["labels"] == video_pad).any(), "video tokens never carry loss"

    out = finetune.train(recipe)
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 1

    # A family without a video input sees the same clip as 4 ordered images.
    as_images = chat_dataset(recipe.data, "train", videos_as_images=True)[0]
    assert len(as_images["images"]) == 4 and as_images["videos"] == []
    assert as_images["messages"][0]["content"] == [{"type": "image"}] * 4 + [
        {"type": "text", "text": "What changes?"}]
    reds = [img.getpixel((10, 10))[0] for img in as_images["images"]]
    assert reds == sorted(reds)
    assert torch.is_tensor(batch["pixel_values_videos"])


def test_imagefolder_captions_expand_to_one_row_per_caption(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    for i in range(2):
        image(i, (20 + i, 16)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "0.png", "captions": ["A.", "B.", "C."]}) + "\n"
        + json.dumps({"file_name": "1.png", "captions": ["D."]}) + "\n")
    recipe = media_recipe(folder, "caption", tmp_path, expand_captions=True)
    data = chat_dataset(recipe.data, "train")
    rows = [data[i] for i in range(len(data))]
    assert [r["problem"] for r in rows] == [None] * 4, rows[0]["problem"]
    assert [(r["row_id"], r["messages"][-1]["content"][0]["text"], r["images"][0].size) for r in rows] == [
        (0, "A.", (20, 16)), (0, "B.", (20, 16)), (0, "C.", (20, 16)), (1, "D.", (21, 16))]


def test_a_row_of_the_wrong_shape_is_reported_by_id_not_raised(tmp_path):
    image(0).save(tmp_path / "p.png")
    rows = [{"images": ["p.png"], "texts": [{"user": "What?", "assistant": "A page."}]},
            {"images": ["p.png"], "texts": [{"user": "No answer here"}]},  # a turn without "assistant"
            {"images": ["p.png"], "texts": "not a list of turns"}]
    (tmp_path / "cauldron.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = media_recipe(tmp_path / "cauldron.jsonl", "cauldron", tmp_path)
    data = chat_dataset(recipe.data, "train")
    assert data[0]["problem"] is None
    assert data[1]["problem"] == "malformed row: KeyError: 'assistant'"
    assert data[2]["problem"].startswith("malformed row: TypeError:")
    _, family, _, collator = load_processing(recipe)
    _, report = scanned(recipe, "train", family, collator)
    assert report.kept == [0] and report.dropped == {"malformed row": [1, 2]}


def test_evaluation_scores_video_rows_and_every_assistant_turn(tmp_path):
    """Regression: evaluation skipped rows with videos and scored only the last assistant reply of each row."""
    from finetune.evaluation.heldout import evaluate, examples
    from finetune.evaluation.inference import load_target

    write_video(tmp_path / "clip.mp4")
    image(0).save(tmp_path / "a.png")
    image(1).save(tmp_path / "b.png")

    def turn(role, *parts):
        return {"role": role, "content": [{"type": p} if p in ("image", "video") else {"type": "text", "text": p}
                                          for p in parts]}

    rows = [{"messages": [turn("user", "video", "What changes?"), turn("assistant", "It gets redder.")],
             "videos": ["clip.mp4"], "images": []},
            {"messages": [turn("user", "image", "What is it?"), turn("assistant", "Noise."),
                          turn("user", "image", "And this one?"), turn("assistant", "More noise."),
                          turn("user", "Same?"), turn("assistant", "No.")],
             "images": ["a.png", "b.png"], "videos": []}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = media_recipe(tmp_path, "messages", tmp_path, eval_split="test", video_frames=4)

    items = examples(chat_dataset(recipe.data, "test"))
    assert [(e.row_id, e.turn, e.references, len(e.images), len(e.videos)) for e in items] == [
        (0, 0, ["It gets redder."], 0, 1),
        (1, 0, ["Noise."], 1, 0), (1, 1, ["More noise."], 2, 0), (1, 2, ["No."], 2, 0)]
    # Each later turn is asked with the conversation so far (earlier replies as the data gives them).
    assert [m["role"] for m in items[3].prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert len(items[0].videos[0]) == 4  # the clip's 4 sampled frames reach generation as a video

    result = evaluate(load_target("zoo:qwen2_vl"), recipe=recipe, out_dir=tmp_path / "eval", metric="exact_match",
                      max_new_tokens=2)
    assert result["n"] == 4
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["turn"], r["references"]) for r in records] == [
        (0, 0, ["It gets redder."]), (1, 0, ["Noise."]), (1, 1, ["More noise."]), (1, 2, ["No."])]
