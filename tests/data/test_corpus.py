"""The corpus: the bundled Wikipedia summaries (languages, topics, deterministic splits) and user text."""

import json

import pytest

from moekit.data import by_split, load_text, load_wiki, split_of


@pytest.fixture(scope="module")
def wiki():
    return load_wiki()


def test_bundled_corpus_has_three_languages_with_topics(wiki):
    langs = {d.language for d in wiki}
    assert langs == {"en", "fr", "es"}
    assert len(wiki) > 25_000
    assert all(d.text and d.title and d.topic for d in wiki[:100])
    fr = next(d for d in wiki if d.language == "fr" and d.topic == "Personnalités")
    assert fr.topic_en == "People"


def test_split_is_deterministic_and_by_article(wiki):
    s = by_split(wiki)
    assert 0.85 < len(s["train"]) / len(wiki) < 0.95 and s["validation"] and s["test"]
    assert all(d.split == split_of(f"{d.language}/{d.title}") for d in wiki[:500])
    assert split_of("en/Paris") == split_of("en/Paris")
    titles = {(d.language, d.title) for d in s["train"]}
    assert not titles & {(d.language, d.title) for d in s["validation"]}


def test_user_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("hello world", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "un texte", "language": "fr"}) + "\n\n", encoding="utf-8")
    assert [d.text for d in load_text(tmp_path / "a.txt")] == ["first paragraph", "second paragraph"]
    docs = load_text(tmp_path)
    assert sorted(d.text for d in docs) == ["first paragraph", "hello world", "second paragraph", "un texte"]
    assert next(d for d in docs if d.text == "un texte").language == "fr"


def test_user_text_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8"):
        load_text(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text found"):
        load_text(tmp_path / "empty.txt")
    j = tmp_path / "x.jsonl"
    j.write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: each JSONL line needs a string field 'text'"):
        load_text(j)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="has no text files"):
        load_text(tmp_path / "d")


