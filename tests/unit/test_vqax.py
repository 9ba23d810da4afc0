"""The VQA-X JSON loader reads the published format and round-trips through the writer."""

import json

from illume.data import load_vqax, save_vqax


def test_loads_the_published_format(tmp_path):
    entry = {
        "question": "What is the man holding?",
        "answers": [
            {"answer": "umbrella", "answer_confidence": "yes", "answer_id": 1},
            {"answer": "umbrella", "answer_confidence": "yes", "answer_id": 2},
            {"answer": "bag", "answer_confidence": "maybe", "answer_id": 3},
        ],
        "explanation": ["he is holding it above his head in the rain", "it is raining"],
        "image_id": 262148,
        "image_name": "COCO_val2014_000000262148.jpg",
    }
    (tmp_path / "test.json").write_text(json.dumps({"262148000": entry}))
    [item] = load_vqax(tmp_path / "test.json")
    assert item.question_id == "262148000"
    assert item.answer == "umbrella"
    assert item.explanations == ("he is holding it above his head in the rain", "it is raining")
    assert item.image_path == tmp_path / "images" / "COCO_val2014_000000262148.jpg"
    save_vqax([item], tmp_path / "copy.json")
    [again] = load_vqax(tmp_path / "copy.json", image_dir=tmp_path / "images")
    assert (again.question, again.answers, again.explanations, again.image_path) == (
        item.question,
        item.answers,
        item.explanations,
        item.image_path,
    )


def test_extra_keys_are_kept(tmp_path):
    entry = {
        "question": "q?",
        "answers": ["yes"],
        "explanation": "one",
        "image_name": "a.png",
        "scene": {"k": 1},
    }
    (tmp_path / "x.json").write_text(json.dumps({"1": entry}))
    [item] = load_vqax(tmp_path / "x.json")
    assert item.extra == {"scene": {"k": 1}} and item.explanations == ("one",) and item.answer == "yes"
