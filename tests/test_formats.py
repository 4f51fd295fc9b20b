"""Each dataset format, fed a row in its real schema, gives exactly these messages and this image order."""

import pytest

from finetune.data.formats import (CAPTION_PROMPT, CHARTQA_SYSTEM_PROMPT, RowError, caption, cauldron, chartqa,
                              expand_captions, llava, messages, video, vqa)

IMG = {"type": "image"}


def text(t):
    return {"type": "text", "text": t}


def user(*parts):
    return {"role": "user", "content": list(parts)}


def assistant(t):
    return {"role": "assistant", "content": [text(t)]}


def system(t):
    return {"role": "system", "content": [text(t)]}


def test_chartqa_uses_the_first_label_and_its_system_prompt():
    row = {"image": "a.png", "query": "Which bar is tallest?", "label": ["Red", "red bar"], "human_or_machine": 0}
    assert chartqa(row, None) == {
        "messages": [system(CHARTQA_SYSTEM_PROMPT), user(IMG, text("Which bar is tallest?")), assistant("Red")],
        "images": ["a.png"], "videos": []}
    assert chartqa(row, "")["messages"] == [user(IMG, text("Which bar is tallest?")), assistant("Red")]
    assert chartqa(row, "Be brief.")["messages"][0] == system("Be brief.")


def test_vqav2_takes_the_majority_answer_and_docvqa_the_first():
    vqav2 = {"image": {"bytes": b"...", "path": "coco.jpg"}, "question": "What sport?",
             "answers": [{"answer": "tennis", "answer_confidence": "yes", "answer_id": 1},
                         {"answer": "badminton", "answer_confidence": "maybe", "answer_id": 2},
                         {"answer": "badminton", "answer_confidence": "yes", "answer_id": 3}]}
    assert vqa(vqav2, None) == {"messages": [user(IMG, text("What sport?")), assistant("badminton")],
                                "images": [{"bytes": b"...", "path": "coco.jpg"}], "videos": []}
    assert vqa(dict(vqav2, multiple_choice_answer="tennis"), None)["messages"][-1] == assistant("tennis")
    docvqa = {"image": "doc.png", "question": "What is the date?", "answers": ["1 May 1990", "May 1, 1990"]}
    assert vqa(docvqa, None)["messages"] == [user(IMG, text("What is the date?")), assistant("1 May 1990")]
    with pytest.raises(RowError, match="no non-empty answer"):
        vqa({"image": "x.png", "question": "?", "answers": []}, None)


def test_caption_first_or_expanded_one_row_per_caption():
    row = {"image": "cat.jpg", "captions": ["A cat.", "A sleeping cat.", "Cat on a sofa."]}
    assert caption(row, None) == {"messages": [user(IMG, text(CAPTION_PROMPT)), assistant("A cat.")],
                                  "images": ["cat.jpg"], "videos": []}
    assert caption({"image": "d.jpg", "caption": "A dog.", "prompt": "Caption it."}, None)["messages"] == [
        user(IMG, text("Caption it.")), assistant("A dog.")]

    batch = {"image": ["cat.jpg", "dog.jpg"], "captions": [row["captions"], None], "caption": [None, "A dog."],
             "row_id": [0, 1]}
    out = expand_captions(batch)
    assert out["row_id"] == [0, 0, 0, 1] and out["image"] == ["cat.jpg"] * 3 + ["dog.jpg"]
    assert [caption({k: v[i] for k, v in out.items()}, None)["messages"][-1] for i in range(4)] == [
        assistant("A cat."), assistant("A sleeping cat."), assistant("Cat on a sofa."), assistant("A dog.")]


def test_llava_places_each_image_where_its_placeholder_is():
    row = {"id": "x1", "image": ["left.jpg", "right.jpg"], "conversations": [
        {"from": "human", "value": "Compare <image>\nwith this one:\n<image> What changed?"},
        {"from": "gpt", "value": "The car moved."},
        {"from": "human", "value": "Which is brighter?"},
        {"from": "gpt", "value": "The second."}]}
    assert llava(row, None) == {"messages": [
        user(text("Compare "), IMG, text("with this one:"), IMG, text(" What changed?")),
        assistant("The car moved."), user(text("Which is brighter?")), assistant("The second.")],
        "images": ["left.jpg", "right.jpg"], "videos": []}

    across_turns = {"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A."},
        {"from": "human", "value": "And now <image>"}, {"from": "gpt", "value": "B."}]}
    assert llava(across_turns, None)["messages"] == [user(IMG, text("Describe.")), assistant("A."),
                                                    user(text("And now "), IMG), assistant("B.")]


def test_llava_keeps_the_spaces_around_a_mid_sentence_image():
    """Regression: the spaces around `<image>` inside a sentence were stripped (`Compare<image>and<image>.`)."""
    row = {"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "  Compare <image> and <image>. Are they the same?\n"},
        {"from": "gpt", "value": "No."}]}
    turn = llava(row, None)["messages"][0]
    assert turn == user(text("Compare "), IMG, text(" and "), IMG, text(". Are they the same?"))
    rendered = "".join(p["text"] if p["type"] == "text" else "<image>" for p in turn["content"])
    assert rendered == "Compare <image> and <image>. Are they the same?"


def test_llava_without_placeholder_text_only_and_errors():
    row = {"image": "a.jpg", "conversations": [{"from": "human", "value": "What is this?"},
                                               {"from": "gpt", "value": "A chart."}]}
    assert llava(row, "Sys.")["messages"] == [system("Sys."), user(IMG, text("What is this?")), assistant("A chart.")]
    text_only = {"conversations": [{"from": "system", "value": "Own."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello"}]}
    assert llava(text_only, "Sys.") == {"messages": [system("Own."), user(text("Hi")), assistant("Hello")],
                                        "images": [], "videos": []}
    with pytest.raises(RowError, match="the row has 2 <image> placeholders but 1 images") as e:
        llava({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image> <image>"}]}, None)
    assert e.value.reason == "placeholders != images"
    with pytest.raises(RowError, match="turn from 'bot'"):
        llava({"conversations": [{"from": "bot", "value": "x"}]}, None)


def test_cauldron_puts_all_images_first_in_the_first_turn():
    row = {"images": ["p1.png", "p2.png"], "texts": [
        {"user": "What is on page 1?", "assistant": "A table.", "source": "docvqa"},
        {"user": "And page 2?", "assistant": "A chart.", "source": "docvqa"}]}
    assert cauldron(row, None) == {"messages": [
        user(IMG, IMG, text("What is on page 1?")), assistant("A table."), user(text("And page 2?")),
        assistant("A chart.")], "images": ["p1.png", "p2.png"], "videos": []}


def test_messages_rows_normalise_arrow_parts_and_check_counts():
    row = {"messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": "It says hi."}], "images": ["m.png"]}
    assert messages(row, "Sys.") == {"messages": [system("Sys."), user(IMG, text("Read it.")),
                                                  assistant("It says hi.")], "images": ["m.png"], "videos": []}
    with pytest.raises(RowError, match="the messages have 1 image parts but the row has 2 images"):
        messages(dict(row, images=["m.png", "n.png"]), None)
    with pytest.raises(RowError, match="role 'bot'"):
        messages({"messages": [{"role": "bot", "content": "x"}]}, None)


def test_video_from_a_file_or_from_frames():
    assert video({"video": "clips/a.mp4", "question": "What happens?", "answer": "A ball rolls."}, None) == {
        "messages": [user({"type": "video"}, text("What happens?")), assistant("A ball rolls.")],
        "images": [], "videos": ["clips/a.mp4"]}
    frames = {"frames": ["f0.jpg", "f1.jpg", "f2.jpg"], "prompt": "Describe.", "answer": "Waves."}
    assert video(frames, None)["videos"] == [["f0.jpg", "f1.jpg", "f2.jpg"]]
    with pytest.raises(RowError, match="no value in column 'video' or 'frames'"):
        video({"question": "?", "answer": "!"}, None)
