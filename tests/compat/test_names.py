"""Consul names and IDs kept under DNS labels, and read back as they were given."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.compat.names import Untranslatable, identity, instance_label, service_label
from interknit.registry.model import Instance, InstanceSpec, is_label


def test_labels_stay_as_they_are() -> None:
    assert service_label("web") == "web"
    assert instance_label("web-1") == "web-1"


def test_service_names_translate_or_are_refused() -> None:
    assert service_label("My_App") == "my-app"
    assert service_label("api.v2") == "api-v2"
    for bad in ("_internal", "a/b", "x" * 64, "", "caf\u00e9"):
        with pytest.raises(Untranslatable):
            service_label(bad)


def test_ids_translate_with_a_hash_that_keeps_them_apart() -> None:
    registrator = instance_label("host1:redis:6379")
    assert registrator.startswith("host1-redis-6379-") and is_label(registrator)
    # Differ only in punctuation or case: still different labels.
    assert instance_label("web:1") != instance_label("web.1") != instance_label("WEB:1")
    assert is_label(instance_label(":::"))
    for bad in ("", "has space", "x" * 257, "caf\u00e9"):
        with pytest.raises(Untranslatable):
            instance_label(bad)


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=256
    )
)
def test_every_printable_id_has_a_stable_label(consul_id: str) -> None:
    label = instance_label(consul_id)
    assert is_label(label)
    assert instance_label(consul_id) == label


def test_identity_reads_the_originals_back() -> None:
    spec = InstanceSpec(
        address="10.0.0.1",
        port=80,
        meta=(("consul.id", "h:c:80"), ("consul.service", "My_App"), ("team", "a")),
    )
    ident = identity(Instance(service="my-app", id=instance_label("h:c:80"), spec=spec))
    assert (ident.id, ident.name, ident.check_id) == ("h:c:80", "My_App", "service:h:c:80")
    assert ident.meta == {"team": "a"}
    plain = identity(Instance(service="web", id="w1", spec=InstanceSpec("10.0.0.1", 80)))
    assert (plain.id, plain.name, plain.check_name) == ("w1", "web", "Service 'web' check")
