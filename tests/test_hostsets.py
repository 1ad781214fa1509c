"""Host set expressions: ranges, padding, products, comma lists, errors."""

import pytest

from remote_runner.hostsets import MAX_HOSTS, HostSetError, expand, expand_all


def test_plain_names_and_comma_lists():
    assert expand("h1") == ["h1"]
    assert expand("a, b ,c") == ["a", "b", "c"]
    assert expand("a,b,a") == ["a", "b"]


def test_ranges_and_lists_inside_brackets():
    assert expand("client[1-3]") == ["client1", "client2", "client3"]
    assert expand("h[1,3,5-7]") == ["h1", "h3", "h5", "h6", "h7"]
    assert expand("x[2]") == ["x2"]


def test_zero_padding_follows_the_lower_bound():
    hosts = expand("node[01-64]")
    assert len(hosts) == 64 and hosts[0] == "node01" and hosts[8] == "node09" and hosts[-1] == "node64"
    assert expand("n[8-10]") == ["n8", "n9", "n10"]
    assert expand("n[098-101]") == ["n098", "n099", "n100", "n101"]


def test_several_brackets_multiply_in_order():
    assert expand("rack[1-2]-n[1-3]") == ["rack1-n1", "rack1-n2", "rack1-n3",
                                          "rack2-n1", "rack2-n2", "rack2-n3"]
    assert len(expand("rack[1-2]-n[1-8]")) == 16


def test_commas_inside_brackets_do_not_split():
    assert expand("a[1,2],b[3-4].lab") == ["a1", "a2", "b3.lab", "b4.lab"]


def test_expand_all_merges_lists():
    assert expand_all(["h[1-2]", "h2", "g"]) == ["h1", "h2", "g"]


@pytest.mark.parametrize("bad, words", [
    ("", "empty host set"),
    ("h[1-", "unclosed"),
    ("h]1", "without '['"),
    ("h[[1]]", "nested"),
    ("h[5-2]", "backwards"),
    ("h[a-b]", "bad range 'a-b'"),
    ("h[]", "bad range ''"),
    ("a,,b", "empty name"),
    (f"h[1-{MAX_HOSTS + 1}]", "larger than"),
    ("a[1-1000]b[1-1000]", "more than"),
])
def test_errors_name_the_pattern(bad, words):
    with pytest.raises(HostSetError) as info:
        expand(bad)
    assert words in str(info.value)
