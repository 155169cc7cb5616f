"""Every service's README lists the KESTREL_* variables its processes read, as the code declares them."""

from __future__ import annotations

import msgspec

from kestrel.devtools import envdoc


def test_every_service_readme_has_its_current_table() -> None:
    for path, text in envdoc.expected().items():
        assert path.read_text() == text, f"run `make openapi` and commit {path.name} of {path.parent.name}/"


def test_the_tables_name_every_variable_the_settings_read() -> None:
    for groups in envdoc._groups().values():  # noqa: SLF001
        table = envdoc.table(groups)
        for group in groups:
            for field in msgspec.structs.fields(group.settings):
                assert f"`{group.prefix}_{field.name}`".upper().replace("`", "") in table.replace("`", "")


def test_field_docs_come_from_the_source() -> None:
    from devicesvc.settings import DeviceSettings  # noqa: PLC0415

    docs = envdoc.field_docs(DeviceSettings)
    assert docs["presence_grace_s"].startswith("A device that disconnected")
    assert docs["mqtt_host"].startswith("The broker")  # inherited from MqttSettings
