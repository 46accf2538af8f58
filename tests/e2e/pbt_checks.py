"""What every PBT run's reports must show around an exploit (shared by the PBT e2e tests)."""

from __future__ import annotations

from typing import Any


def after_exploit(rows: dict[str, list[dict]], exploit: dict[str, Any]) -> dict[str, Any]:
    """The recipient's first report after this exploit (its config is the new one)."""
    return next(
        r
        for r in rows[exploit["recipient"]]
        if r["training_iteration"] > exploit["recipient_iteration"]
        and all(r["config"][k] == v for k, v in exploit["new_config"].items())
    )


def donor_report(
    rows: dict[str, list[dict]], exploit: dict[str, Any], first: dict[str, Any]
) -> dict[str, Any]:
    """The donor's report whose checkpoint the recipient restored (linked by the weights' SHA-256).

    Tune's PBT log gives the donor's iteration too, but with synch=True it can
    lag the checkpoint actually cloned by one interval; the fingerprint cannot.
    """
    matches = [
        r for r in rows[exploit["donor"]] if r["weights_sha256"] == first["restored_weights_sha256"]
    ]
    assert matches, (
        f"{exploit['recipient']} restored weights that {exploit['donor']} never checkpointed"
    )
    return matches[0]
