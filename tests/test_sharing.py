"""Read-only sharing (SHARE) against a live secure cluster: an owner lets named tenants
run and inspect one model by `owner/name`; nobody else learns it exists, and a grantee
can neither change, delete nor pass it on.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from bench import zoo
from mtcore.cluster import LocalCluster
from mtcore.errors import BadArgument, Forbidden, ModelNotFound

CLI = [sys.executable, "-m", "mtcore.cli", "--log-level", "warning"]
X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def owned(secure: LocalCluster) -> LocalCluster:
    """`owner` holds model `m` (tiny_add) and `private` (never shared)."""
    for name in ("owner", "friend", "stranger"):
        secure.add_principal(name)
    with secure.client("owner", timeout=120) as owner:
        owner.upload_model("m", zoo.model_bytes("tiny_add"), replace=True)
        owner.upload_model("private", zoo.model_bytes("tiny_add"), replace=True)
    return secure


def test_a_grantee_runs_and_inspects_a_shared_model(owned: LocalCluster) -> None:
    with owned.client("owner") as owner, owned.client("friend") as friend:
        assert owner.share_model("m", grant=["friend"]) == ["friend"]
        mine = owner.infer("m", {"input": X})["output"]
        theirs = friend.infer("owner/m", {"input": X})["output"]
        np.testing.assert_array_equal(mine, theirs)
        info = friend.model_info("owner/m")
        assert (info["name"], info["owner"]) == ("owner/m", "owner")
        assert "owner/m" in [m["name"] for m in friend.shared_models()]
        assert friend.list_models() == []  # its own list holds only its own models
        assert friend.status()["tenant"] == "friend"  # the run was the grantee's


def test_a_grantee_cannot_delete_replace_or_reshare(owned: LocalCluster) -> None:
    with owned.client("owner") as owner, owned.client("friend") as friend:
        owner.share_model("m", grant=["friend"])
        with pytest.raises(Forbidden, match="read-only"):
            friend.delete_model("owner/m")
        with pytest.raises(Forbidden, match="read-only"):
            friend.share_model("owner/m", grant=["stranger"])
        with pytest.raises(BadArgument, match="not valid"):  # no upload into another's names
            friend.upload_model("owner/m", zoo.model_bytes("tiny_add"))
        assert owner.infer("m", {"input": X})["output"].shape == (1, 4)


def test_others_learn_nothing_of_models_not_shared_with_them(owned: LocalCluster) -> None:
    with owned.client("stranger") as stranger:
        errors = []
        for ref in ("owner/m", "owner/private", "owner/nothing-here", "nobody/m"):
            with pytest.raises(ModelNotFound) as caught:
                stranger.infer(ref, {"input": X})
            errors.append(str(caught.value).replace(ref, "REF"))
            with pytest.raises(ModelNotFound):
                stranger.model_info(ref)
        assert len(set(errors)) == 1  # the same answer whether the model exists or not
        assert stranger.shared_models() == []


def test_revoking_stops_the_grantee_at_once(owned: LocalCluster) -> None:
    with owned.client("owner") as owner, owned.client("friend") as friend:
        owner.share_model("private", grant=["friend"])
        assert friend.infer("owner/private", {"input": X})["output"].shape == (1, 4)
        assert owner.share_model("private", revoke=["friend"]) == []
        with pytest.raises(ModelNotFound):
            friend.infer("owner/private", {"input": X})


def test_share_names_only_known_tenants_and_never_yourself(owned: LocalCluster) -> None:
    with owned.client("owner") as owner:
        with pytest.raises(BadArgument, match="no tenant 'ghost'"):
            owner.share_model("m", grant=["ghost"])
        with pytest.raises(BadArgument, match="yourself"):
            owner.share_model("m", grant=["owner"])
        with pytest.raises(BadArgument, match="both"):
            owner.share_model("m", grant=["friend"], revoke=["friend"])
        with pytest.raises(ModelNotFound):
            owner.share_model("absent", grant=["friend"])


def test_deleting_a_model_ends_its_shares(owned: LocalCluster) -> None:
    with owned.client("owner") as owner, owned.client("friend") as friend:
        owner.upload_model("brief", zoo.model_bytes("tiny_add"))
        owner.share_model("brief", grant=["friend"])
        owner.delete_model("brief")
        owner.upload_model("brief", zoo.model_bytes("tiny_add"))  # same name, new model
        with pytest.raises(ModelNotFound):
            friend.infer("owner/brief", {"input": X})
        assert owner.share_model("brief") == []


def test_a_removed_tenant_loses_its_grants_and_a_new_one_of_its_name_gets_none(
    owned: LocalCluster,
) -> None:
    owned.add_principal("passing")
    with owned.client("owner") as owner:
        owner.share_model("m", grant=["passing"])
        remove = [*CLI, "tenant", "remove", "passing", "--state-dir", str(owned.state_dir)]
        done = subprocess.run(remove, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        stop = time.monotonic() + 30  # the broker reads the change on its next tick
        while "passing" in owner.share_model("m") and time.monotonic() < stop:
            time.sleep(0.05)
        assert "passing" not in owner.share_model("m")
    (owned.state_dir / "keys" / "passing.key_secret").unlink(missing_ok=True)
    with owned.client("passing") as newcomer, pytest.raises(ModelNotFound):
        newcomer.infer("owner/m", {"input": X})
