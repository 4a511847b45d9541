from distillflow.base import records


def test_normalise_prompt_collapses_whitespace_and_nfc() -> None:
    assert records.normalise_prompt("  Add\t2 \n and  3. ") == "Add 2 and 3."
    assert records.normalise_prompt("cafe\u0301") == "caf\u00e9"


def test_ids_are_stable_content_hashes() -> None:
    pid = records.prompt_id("Add 2 and 3.")
    assert pid == records.prompt_id("Add 2 and 3.")
    assert len(pid) == records.ID_HEX_CHARS
    assert pid != records.prompt_id("Add 2 and 4.")
    g0 = records.generation_id(pid, "sha256:x", {"t": 1.0, "seed": 1}, 0)
    assert g0 == records.generation_id(pid, "sha256:x", {"seed": 1, "t": 1.0}, 0)  # key order irrelevant
    assert g0 != records.generation_id(pid, "sha256:x", {"t": 1.0, "seed": 1}, 1)
    assert g0 != records.generation_id(pid, "sha256:y", {"t": 1.0, "seed": 1}, 0)
    assert records.pair_id(pid, g0, "b") != records.pair_id(pid, "b", g0)


def test_content_id_is_unambiguous_under_concatenation() -> None:
    assert records.content_id("k", "ab", "c") != records.content_id("k", "a", "bc")
    assert records.content_id("prompt", "x") != records.content_id("pair", "x")


def test_split_is_a_pure_function_with_the_requested_fraction() -> None:
    ids = [records.prompt_id(f"prompt {i}") for i in range(20000)]
    splits = [records.split_of(i, 0.1, 0.0) for i in ids]
    assert splits == [records.split_of(i, 0.1, 0.0) for i in ids]
    share = splits.count("eval") / len(splits)
    assert 0.09 < share < 0.11
    # A larger eval fraction only moves prompts from train to eval, never back.
    assert all(records.split_of(i, 0.2, 0.0) == "eval" for i, s in zip(ids, splits) if s == "eval")


def test_the_split_key_is_the_prompt_id_or_the_group_id() -> None:
    """Ungrouped, a prompt's split is its id's, as before groups existed; grouped, every
    prompt of the group has the group's split whatever its own id."""
    pid = records.prompt_id("Add 2 and 3.")
    assert records.split_key(pid, None) == pid
    assert records.split_key(pid, "add:a=2,b=3") == records.content_id("group", "add:a=2,b=3") != pid
    ids = [records.prompt_id(f"phrasing {i}") for i in range(200)]
    assert len({records.split_of(i, 0.5, 0.2) for i in ids}) == 3  # ungrouped they scatter
    assert {records.split_of(records.split_key(i, "conv-7"), 0.5, 0.2) for i in ids} == {
        records.split_of(records.content_id("group", "conv-7"), 0.5, 0.2)
    }
