"""The revocation list: written atomically, read again by a running coordinator when it changes."""

import pytest

from coordinator.revocations import RevocationList, revoke


def test_revoked_users_are_seen_by_a_list_made_before(tmp_path):
    revoked = RevocationList(tmp_path)
    assert "eve" not in revoked
    assert revoke(tmp_path, "eve") and not revoke(tmp_path, "eve")
    assert "eve" in revoked and "alice" not in revoked
    revoke(tmp_path, "mallory")
    assert "mallory" in revoked and "eve" in revoked
    assert (tmp_path / "revoked.txt").read_text() == "eve\nmallory\n"
    assert [path.name for path in tmp_path.iterdir()] == ["revoked.txt"]  # no temporary file left


@pytest.mark.parametrize("name", ["", " eve", "eve\nalice"])
def test_a_name_that_cannot_be_a_line_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="is not a user name"):
        revoke(tmp_path, name)
