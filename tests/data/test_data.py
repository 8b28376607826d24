import json

import pytest
import torch

from moekit.data import TokenStream, by_split, load_text, load_wiki, split_of, train_tokenizer
from moekit.data.corpus import Document


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


def test_tokenizer_cache_hit_and_miss(tmp_path):
    texts = ["the cat sat on the mat " * 20, "le chat est sur le tapis " * 20]
    tok, hit = train_tokenizer(texts, 300, cache_dir=tmp_path)
    assert not hit and tok.get_vocab_size() <= 300
    again, hit = train_tokenizer(texts, 300, cache_dir=tmp_path)
    assert hit and again.to_str() == tok.to_str()
    _, hit = train_tokenizer(texts + ["new text"], 300, cache_dir=tmp_path)
    assert not hit
    _, hit = train_tokenizer(texts, 280, cache_dir=tmp_path)
    assert not hit
    assert tok.decode(tok.encode("the cat").ids) == "the cat"


def test_token_stream_batches_are_a_function_of_the_step(tmp_path):
    tok, _ = train_tokenizer(["abc def ghi " * 50], 280, cache_dir=tmp_path)
    docs = [Document("abc def ghi " * 30, f"d{i}", "en", "t") for i in range(4)]
    s = TokenStream.from_documents(docs, tok)
    x1, y1 = s.batch(7, 4, 16, seed=1)
    x2, y2 = s.batch(7, 4, 16, seed=1)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(s.batch(8, 4, 16, seed=1)[0], x1)
    with pytest.raises(ValueError, match="too small for seq_len=100000"):
        s.check_fits(100_000, "training data")
    x, y, d = s.chunks(16, max_chunks=3)
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1]) and d.max() < 4
