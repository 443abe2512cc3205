"""Admin tokens: the file of digests, Bearer checks, the entry the CLI prints."""
from __future__ import annotations

import hashlib
import tomllib

import pytest

from gridgate.security.admin_tokens import SCOPES, AdminToken, AdminTokens, entry_toml, new_token


def test_a_new_token_checks_against_the_entry_made_for_it():
    token = new_token()
    assert token.startswith("ggadm_") and len(token) == 6 + 43
    entry = entry_toml("ops", token, ["devices:read", "commands:write", "devices:read"])
    assert token not in entry                       # only its digest is written
    tokens, problems = AdminTokens.parse(entry, "t.toml")
    assert problems == []
    assert tokens.check(f"Bearer {token}") == AdminToken("ops", frozenset({"devices:read", "commands:write"}))
    assert tokens.check(f"bearer   {token} ") is not None          # scheme is case-insensitive
    assert tomllib.loads(entry)["token"][0]["scopes"] == ["devices:read", "commands:write"]


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic b3BzOng=", "Bearer wrong",
                                    "Bearer " + "x" * 10_000])
def test_anything_else_opens_nothing(header):
    tokens, _ = AdminTokens.parse(entry_toml("ops", new_token(), ["bans:write"]), "t.toml")
    assert tokens.check(header) is None


def test_problems_are_all_reported_and_never_echo_a_secret():
    token = new_token()
    text = ('[[token]]\nname = "a"\nsha256 = "' + hashlib.sha256(b"x").hexdigest() + '"\nscopes = ["devices:read"]\n'
            '[[token]]\nname = "a"\nsha256 = "' + hashlib.sha256(b"y").hexdigest() + '"\nscopes = ["devices:read"]\n'
            '[[token]]\nname = "b"\nsha256 = "' + token + '"\nscopes = ["devices:read"]\n'
            '[[token]]\nname = "c"\nsha256 = "' + hashlib.sha256(b"z").hexdigest() + '"\nscopes = ["root"]\n'
            '[[token]]\nname = "bad name"\n'
            '[[token]]\nname = "d"\nsha256 = "' + hashlib.sha256(b"x").hexdigest() + '"\nscopes = ["bans:write"]\n')
    tokens, problems = AdminTokens.parse(text, "t.toml")
    assert problems == [
        "t.toml: token 'a': the name is used twice",
        "t.toml: token 'b': sha256 must be 64 lower-case hex digits (the digest, not the token)",
        "t.toml: token 'c': scopes must be a non-empty list of " + ", ".join(SCOPES),
        "t.toml: token #5: name must be 1-64 of A-Z a-z 0-9 _ . @ - (got 'bad name')",
        "t.toml: token 'd': the same token as 'a'",
    ]
    assert all(token not in p for p in problems)


def test_unreadable_or_not_toml(tmp_path):
    assert AdminTokens.load(str(tmp_path / "missing.toml"))[1][0].startswith("admin.tokens_file ")
    path = tmp_path / "t.toml"
    path.write_text("token = 3\n")
    assert AdminTokens.load(str(path))[1] == [
        f"admin.tokens_file {str(path)!r}: token must be an array of tables ([[token]])"]


def test_entry_toml_refuses_unknown_scopes_and_bad_names():
    with pytest.raises(ValueError, match="unknown scope"):
        entry_toml("ops", new_token(), ["root"])
    with pytest.raises(ValueError, match="at least one"):
        entry_toml("ops", new_token(), [])
    with pytest.raises(ValueError, match="name must be"):
        entry_toml("", new_token(), ["bans:write"])
