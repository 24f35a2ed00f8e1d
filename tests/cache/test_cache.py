import json
import os
import subprocess
import sys

import pytest
import torch
from cache_fixtures import make_examples, make_teacher, make_tokenizer

from rlkd_onpolicy.cache import TeacherCache, build_cache
from rlkd_onpolicy.cache.__main__ import load_prompt_completion_dataset, main
from rlkd_onpolicy.cache.format import SUBNORMAL_ERROR, UNIT_ROUNDOFF
from rlkd_onpolicy.data import tokenize_example
from rlkd_onpolicy.losses import teacher_topk


def expected_topk(teacher, tokenizer, example, k, temperature):
    """The teacher's top-K for one example, from an unbatched forward pass (float32)."""
    tok = tokenize_example(tokenizer, example)
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([tok.input_ids])).logits[0]
    start, length = tok.completion_start, len(tok.completion_ids)
    return tok, teacher_topk(logits[start - 1 : start - 1 + length], k, temperature)


# each storage dtype, with its documented error bound; float32 is exact
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_ids_exact_logprobs_within_bound(tiny, tmp_path, dtype):
    _, _, tokenizer, teacher = tiny
    examples = make_examples(5)
    build_cache(teacher, tokenizer, examples, str(tmp_path), k=7, temperature=0.7, dtype=dtype, batch_size=1,
                shard_size=2, teacher_name="tiny", progress=False)
    cache = TeacherCache.open(str(tmp_path), tokenizer=tokenizer, expect_teacher="tiny", expect_k=7,
                              expect_temperature=0.7)
    cache.verify()
    assert len(cache) == 5
    for i, example in enumerate(examples):
        tok, (ids, logprobs, tail) = expected_topk(teacher, tokenizer, example, 7, 0.7)
        entry = cache[i]
        assert entry["input_ids"].tolist() == tok.input_ids
        assert entry["completion_start"] == tok.completion_start
        assert entry["topk_ids"].shape == (len(tok.completion_ids), 7)
        assert torch.equal(entry["topk_ids"], ids)
        bound = UNIT_ROUNDOFF[dtype] * logprobs.abs() + SUBNORMAL_ERROR[dtype]
        assert ((entry["topk_logprobs"] - logprobs).abs() <= bound).all()
        assert torch.equal(entry["tail_logprob"], tail)  # the tail is always stored in float32


def test_batched_build_matches_unbatched(tiny, tmp_path):
    _, _, tokenizer, teacher = tiny
    examples = make_examples(7)  # different lengths, so right padding is exercised
    build_cache(teacher, tokenizer, examples, str(tmp_path), k=5, dtype="float32", batch_size=4, shard_size=3,
                progress=False)
    cache = TeacherCache.open(str(tmp_path), tokenizer=tokenizer)
    for i, example in enumerate(examples):
        _, (ids, logprobs, tail) = expected_topk(teacher, tokenizer, example, 5, 1.0)
        assert torch.equal(cache[i]["topk_ids"], ids)
        torch.testing.assert_close(cache[i]["topk_logprobs"], logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[i]["tail_logprob"], tail, rtol=1e-5, atol=1e-5)


def test_teacher_topk():
    logits = torch.randn(3, 4, 50, dtype=torch.float64)
    ids, logprobs, tail = teacher_topk(logits, 6, temperature=2.0)
    dense = torch.log_softmax(logits / 2.0, -1)
    assert ids.shape == (3, 4, 6) and logprobs.dtype == torch.float64  # float32 for half inputs, else kept
    torch.testing.assert_close(logprobs, dense.gather(-1, ids))
    assert teacher_topk(logits.bfloat16(), 6).logprobs.dtype == torch.float32
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.logaddexp(logprobs.logsumexp(-1), tail), zeros, atol=1e-12, rtol=0)
    _, _, full_tail = teacher_topk(logits, 50)
    assert torch.isneginf(full_tail).all()  # K = V: no tail mass
    with pytest.raises(ValueError, match="k=51"):
        teacher_topk(logits, 51)


def test_truncated_and_flipped_shards_are_detected(tiny, tmp_path):
    _, _, tokenizer, teacher = tiny
    build_cache(teacher, tokenizer, make_examples(6), str(tmp_path), k=4, shard_size=2, progress=False)
    shard = tmp_path / "shard-00001.safetensors"
    original = shard.read_bytes()

    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError, match="truncated"):
        TeacherCache.open(str(tmp_path), tokenizer=tokenizer)

    flipped = bytearray(original)
    flipped[len(flipped) - 20] ^= 0x01  # inside the tensor data, same size: only the checksum can see it
    shard.write_bytes(bytes(flipped))
    cache = TeacherCache.open(str(tmp_path), tokenizer=tokenizer)
    assert cache[0]["topk_ids"].shape[1] == 4  # shard 0 is intact and readable
    with pytest.raises(ValueError, match="SHA-256"):
        cache[2]
    with pytest.raises(ValueError, match="SHA-256"):
        cache.verify()


def test_interrupted_build_resumes_without_duplicates(tiny, tmp_path):
    _, _, tokenizer, teacher = tiny
    examples = make_examples(11)
    out = tmp_path / "partial"

    def crash_after_shard_2(index):
        if index == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(teacher, tokenizer, examples, str(out), k=4, shard_size=2, progress=False,
                    on_shard_written=crash_after_shard_2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert manifest["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache.open(str(out), tokenizer=tokenizer)
    assert len(TeacherCache.open(str(out), tokenizer=tokenizer, allow_partial=True)) == 4
    # What a crash mid-write leaves: a shard renamed but not yet listed, and a temporary file.
    (out / "shard-00002.safetensors").write_bytes(b"half a shard")
    (out / "shard-00003.safetensors.tmp-12345").write_bytes(b"partial")

    written = []
    build_cache(teacher, tokenizer, examples, str(out), k=4, shard_size=2, progress=False,
                on_shard_written=written.append)
    assert written == [2, 3, 4, 5]  # shards 0 and 1 were not redone
    assert not [f for f in os.listdir(out) if ".tmp-" in f]

    fresh = tmp_path / "fresh"
    build_cache(teacher, tokenizer, examples, str(fresh), k=4, shard_size=2, progress=False)
    resumed, reference = TeacherCache.open(str(out), tokenizer=tokenizer), TeacherCache.open(str(fresh))
    resumed.verify()
    assert len(resumed) == len(reference) == 11
    for i in range(11):
        for key, value in reference[i].items():
            assert torch.equal(torch.as_tensor(resumed[i][key]), torch.as_tensor(value)), (i, key)


def test_mismatches_fail_clearly(tiny, tmp_path):
    _, _, tokenizer, teacher = tiny
    build_cache(teacher, tokenizer, make_examples(3), str(tmp_path), k=4, temperature=1.0, shard_size=2,
                teacher_name="tiny", progress=False)
    other_tokenizer = make_tokenizer(["completely different words here", "and a second line"])
    with pytest.raises(ValueError, match="another tokenizer"):
        TeacherCache.open(str(tmp_path), tokenizer=other_tokenizer)
    with pytest.raises(ValueError, match="teacher 'tiny', not 'big'"):
        TeacherCache.open(str(tmp_path), expect_teacher="big")
    with pytest.raises(ValueError, match="k=4, not the k=8"):
        TeacherCache.open(str(tmp_path), expect_k=8)
    with pytest.raises(ValueError, match="temperature=1.0, not 2.0"):
        TeacherCache.open(str(tmp_path), expect_temperature=2.0)
    with pytest.raises(ValueError, match=r"another header \(k: cached 4, requested 8"):
        build_cache(teacher, tokenizer, make_examples(3), str(tmp_path), k=8, shard_size=2, teacher_name="tiny",
                    progress=False)
    with pytest.raises(ValueError, match="not a teacher cache"):
        TeacherCache.open(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="tokens but the teacher's logits have only V=8"):
        build_cache(make_teacher(8), tokenizer, make_examples(3), str(tmp_path / "small"), k=4, progress=False)


def test_dataset_loading_from_saved_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(make_examples(3))}).save_to_disk(tmp_path / "saved")
    loaded = load_prompt_completion_dataset(str(tmp_path / "saved"), "train")
    assert loaded[1] == make_examples(3)[1]
    with pytest.raises(ValueError, match="--split 'test'"):
        load_prompt_completion_dataset(str(tmp_path / "saved"), "test")


def test_cli_build_and_verify(tiny, tmp_path, capsys):
    folder, data, tokenizer, _ = tiny
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "rlkd_onpolicy.cache", "build", "--teacher", str(folder), "--dataset",
               str(data), "--out", str(out), "--k", "4", "--shard-size", "4", "--batch-size", "3",
               "--dtype", "bfloat16", "--max-length", "12", "--temperature", "0.5", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cache = TeacherCache.open(str(out), tokenizer=tokenizer, expect_teacher=str(folder), expect_k=4,
                              expect_temperature=0.5)
    assert len(cache) == 11 and len(cache.shards) == 3
    assert all(len(cache[i]["input_ids"]) <= 12 for i in range(11))
    assert main(["verify", str(out)]) == 0  # in-process: a second interpreter start costs seconds
    assert "11 examples in 3 shards, all checksums match" in capsys.readouterr().out


def _tokenized(tokenizer, examples, **kw):
    return [tokenize_example(tokenizer, e, **kw) for e in examples]


def test_every_example_is_checked_against_the_cache_by_its_hash(tiny, tmp_path):
    """Issue 15, defect 5: a cache built from another version of the dataset (same number of examples) was found
    only when the differing example's batch came up. `check_examples` compares every example's stored hash before
    any work and says which example differs and how: edited (its first differing token) or moved (shuffled)."""
    _, _, tokenizer, teacher = tiny
    examples = make_examples(7)
    build_cache(teacher, tokenizer, examples, str(tmp_path), k=4, shard_size=3, teacher_name="tiny", progress=False)
    cache = TeacherCache.open(str(tmp_path), tokenizer=tokenizer)
    cache.verify()
    assert len(cache.example_hashes()) == 7
    cache.check_examples(_tokenized(tokenizer, examples), max_length=None, max_prompt_length=None)  # the same data

    edited = [dict(e) for e in examples]
    edited[5]["completion"] = edited[5]["completion"].replace("the", "a", 1)  # one word: same length
    with pytest.raises(ValueError, match=r"another version of train_dataset: 1 of 7 examples .* \(first: example 5; "
                                         r"its completion has \d+ tokens here and \d+ in the cache and first differs "
                                         r"at token \d+: 'a' here, 'the' in the cache \(the example was edited\)\)"):
        cache.check_examples(_tokenized(tokenizer, edited), max_length=None, max_prompt_length=None,
                             tokenizer=tokenizer)
    shuffled = examples[1:] + examples[:1]  # rotated; the last one stays equal (make_examples repeats after 6)
    with pytest.raises(ValueError, match=r"6 of 7 examples .* \(first: example 0; it is the cache's example 1, and 6 "
                                         r"of the 6 differing examples are elsewhere in the cache: the dataset was "
                                         r"reordered or shuffled"):
        cache.check_examples(_tokenized(tokenizer, shuffled), max_length=None, max_prompt_length=None)
    with pytest.raises(ValueError, match=r"trainer tokenises with max_length=6 \(the cache's None\)"):
        cache.check_examples(_tokenized(tokenizer, examples, max_length=6), max_length=6, max_prompt_length=None)


def test_a_cache_of_format_version_1_is_refused_with_the_reason(tiny, tmp_path):
    """Issue 15, defect 5: version 2 adds the per-example hashes; a version-1 cache cannot be checked against a
    dataset, so it is refused when opened, saying why and what to do."""
    _, _, tokenizer, teacher = tiny
    build_cache(teacher, tokenizer, make_examples(3), str(tmp_path), k=4, teacher_name="tiny", progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["header"]["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format_version=1 is not the version this library reads \(2\) \(version 1 "
                                         r"stores no per-example hashes.*rebuild the cache"):
        TeacherCache.open(str(tmp_path), tokenizer=tokenizer)


def test_the_builder_refuses_an_empty_prompt_naming_the_row(tmp_path):
    """Issue 15, defect 4, in the cache builder (shared check): with a tokenizer that adds no BOS an empty prompt has
    no tokens, so nothing predicts the first completion token."""
    from tiny_models import tiny_llama, tiny_tokenizer

    examples = [{"prompt": "the cat", "completion": "le chat"}, {"prompt": "", "completion": "le chien"}]
    with pytest.raises(ValueError, match=r"the dataset row 1 has an empty prompt \(''"):
        build_cache(tiny_llama(64), tiny_tokenizer(), examples, str(tmp_path), k=4, progress=False)


def test_verify_checks_the_stored_hashes_against_the_stored_ids(tiny, tmp_path):
    """The hashes stand for the ids only if they are the ids' hashes: a shard whose hash was rewritten (with a valid
    checksum in the manifest) fails `verify`."""
    from safetensors.torch import load, save

    from rlkd_onpolicy.cache.format import sha256_bytes

    _, _, tokenizer, teacher = tiny
    build_cache(teacher, tokenizer, make_examples(4), str(tmp_path), k=4, shard_size=2, progress=False)
    shard = tmp_path / "shard-00001.safetensors"
    tensors = load(shard.read_bytes())
    tensors["example_hash"][1, 0] ^= 1
    data = save(tensors)
    shard.write_bytes(data)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1].update(bytes=len(data), sha256=sha256_bytes(data))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cache = TeacherCache.open(str(tmp_path), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="Shard shard-00001.safetensors is inconsistent"):
        cache.verify()


def test_cli_refuses_bad_input_before_writing_anything(tiny, tmp_path, capsys):
    """Issue 31: an empty .jsonl gave a bare StopIteration; wrong columns left an empty --out folder behind;
    --max-length 4 --max-prompt-length 8 built a cache no trainer could use; build --help showed no defaults."""
    folder, data, _, _ = tiny
    base = ["build", "--teacher", str(folder), "--k", "4", "--no-progress"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no example"):
        main([*base, "--dataset", str(empty), "--out", str(tmp_path / "a")])
    columns = tmp_path / "columns.jsonl"
    columns.write_text(json.dumps({"question": "the cat", "answer": "le chat"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt', 'completion'\]"):
        main([*base, "--dataset", str(columns), "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match=r"max_prompt_length=8 must be < max_length=4"):
        main([*base, "--dataset", str(data), "--out", str(tmp_path / "c"), "--max-length", "4",
              "--max-prompt-length", "8"])
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing left behind
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "(default: 64)" in capsys.readouterr().out
