"""The YAML description of the declarative SQL worker (dsrflow.sqlworker.spec): what it yields,
the erasure order, and the one-line errors of a description that cannot be right."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dsrflow.rights import Action, IdentifierType
from dsrflow.sqlworker import SpecError, erase_order, load_spec, parse_spec, quote_ident

LOYALTY = Path(__file__).parents[2] / "examples" / "loyalty" / "loyalty.yaml"

BASE: dict[str, Any] = {
    "system": {"name": "shop"},
    "subject": {"table": "customers", "identifiers": {"email": "email", "phone": "phone"}},
    "tables": {
        "customers": {
            "columns": {"email": "user.contact.email", "phone": "user.contact.phone_number", "name": "user.name"},
            "other_columns": ["id"],
        },
        "orders": {
            "relation": {"column": "customer_id", "references": "customers"},
            "columns": {"address": "user.contact.address"},
        },
        "order_lines": {
            "relation": {"column": "order_id", "references": "orders.id"},
            "columns": {"note": "user.content.private"},
        },
    },
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """BASE with ``tables.<name>`` replaced (or removed when None)."""
    data = copy.deepcopy(BASE)
    for name, table in changes.items():
        if table is None:
            del data["tables"][name]
        else:
            data["tables"][name] = table
    return data


def error(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as raised:
        parse_spec(data, source="shop.yaml")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("shop.yaml: ")
    return message


def test_the_loyalty_example_loads_and_declares_its_system() -> None:
    spec = load_spec(LOYALTY)
    decl = spec.declaration()
    assert decl.name == "loyalty"
    assert decl.identifier_types == (IdentifierType.email, IdentifierType.phone, IdentifierType.customer_id)
    assert decl.actions == (Action.export, Action.erase, Action.rectify, Action.restrict, Action.lift_restriction)
    assert "user.content.private" in decl.categories and "user.financial" in decl.categories
    assert {r.category for r in decl.retention} == {"user.financial", "user.name"}
    assert all(r.period == timedelta(days=3653) and "88/2015/QH13" in r.legal_basis for r in decl.retention)
    assert decl.storage_country == "VN" and decl.backup_retention == timedelta(days=35)


def test_a_minimal_description_declares_export_and_erase_only() -> None:
    decl = parse_spec(BASE).declaration()
    assert decl.actions == (Action.export, Action.erase)
    assert decl.retention == ()
    assert decl.categories == ("user.contact.address", "user.contact.email", "user.contact.phone_number",
                               "user.content.private", "user.name")


def test_undeclared_actions_are_left_out_and_impossible_ones_refused() -> None:
    data = copy.deepcopy(BASE)
    data["tables"]["customers"]["rectify"] = {"name": "name"}
    data["system"]["actions"] = ["export", "erase"]
    assert parse_spec(data).declaration().actions == (Action.export, Action.erase)
    data["system"]["actions"] = ["export", "erase", "restrict"]
    assert "system.actions names restrict, which the tables do not allow" in error(data)


# -- the erasure order ---------------------------------------------------------------------------


def test_erase_order_puts_children_first() -> None:
    spec = parse_spec(BASE)
    assert erase_order(spec) == ["order_lines", "orders", "customers"]


def test_erase_order_follows_extra_foreign_keys_and_is_stable() -> None:
    data = spec_with(invoices={"relation": {"column": "customer_id", "references": "customers"},
                               "columns": {"total": "user.financial"}})
    spec = parse_spec(data)
    assert erase_order(spec) == ["invoices", "order_lines", "orders", "customers"]
    # the database says invoices point at order_lines too: order_lines can only go after invoices
    order = erase_order(spec, {("invoices", "order_lines"), ("orders", "orders")})  # a self-reference is no edge
    assert order.index("invoices") < order.index("order_lines") < order.index("orders") < order.index("customers")
    # and an edge the other way round makes a cycle
    with pytest.raises(ValueError, match=r"relations form a cycle: .*order_lines.*invoices"):
        erase_order(spec, {("invoices", "order_lines"), ("order_lines", "invoices")})


def test_a_cycle_in_the_relations_is_refused() -> None:
    data = spec_with(
        a={"relation": {"column": "b_id", "references": "b"}, "columns": {"x": "user.name"}},
        b={"relation": {"column": "a_id", "references": "a"}, "columns": {"y": "user.name"}},
    )
    assert "relations form a cycle: a -> b -> a" in error(data)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "expected"), [
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "shred",
      "columns": {"x": "user.name"}},
     "erase strategy 'shred' is not one of delete, null, hash, anonymise, retain"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "retain",
      "columns": {"customer_id": {"erase": "null"}, "total": "user.financial"}},
     "table invoices: column total is retained without a legal basis"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "retain",
      "retain": {"legal_basis": "  ", "period": "10 years"},
      "columns": {"customer_id": {"erase": "null"}, "total": "user.financial"}},
     "legal_basis is blank"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "retain",
      "retain": {"legal_basis": "Accounting law", "period": "forever"},
      "columns": {"customer_id": {"erase": "null"}, "total": "user.financial"}},
     "period 'forever' is not 'N years' or 'N days'"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "retain",
      "retain": {"legal_basis": "Accounting law", "period": "10 years"},
      "columns": {"total": "user.financial"}},
     "table invoices: its rows are kept, so describe its relation column customer_id"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "retain",
      "retain": {"legal_basis": "Accounting law", "period": "10 years"},
      "columns": {"customer_id": {"category": "user.unique_id", "erase": "retain"}, "total": "user.financial"}},
     "table invoices: its rows are kept but the rows of customers it points at are deleted: give column "
     "customer_id erase: null"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "erase": "null",
      "columns": {"customer_id": {"erase": "null"}, "buyer": {"category": "user.name", "erase": "anonymise"}}},
     "table invoices: column buyer says erase: anonymise without a replacement"),
    ({"relation": {"column": "customer_id", "references": "customers"},
      "columns": {"buyer": {"category": "user.name", "erase": "hash"}}},
     "table invoices: its rows are deleted (erase: delete), so column buyer cannot say erase: hash"),
    ({"relation": {"column": "customer_id", "references": "vendors"}, "columns": {"x": "user.name"}},
     "table invoices: relation references 'vendors', which is not described"),
    ({"columns": {"x": "user.name"}},
     "table invoices: give its relation (column, references)"),
    ({"relation": {"column": "customer id", "references": "customers"}, "columns": {"x": "user.name"}},
     "column 'customer id' is not a plain SQL name"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "columns": {"x": {}}},
     "table invoices: column x has no category"),
    ({"relation": {"column": "customer_id", "references": "customers"}, "columns": {"x": "user.name"},
      "rectify": {"shoe_size": "x"}},
     "rectify field 'shoe_size' is not one of name, email, phone, address, date_of_birth"),
])
def test_a_table_that_cannot_be_right_is_refused(table: dict[str, Any], expected: str) -> None:
    assert expected in error(spec_with(invoices=table))


def test_a_hash_needs_its_key() -> None:
    data = copy.deepcopy(BASE)
    data["tables"]["orders"] = {"relation": {"column": "customer_id", "references": "customers"}, "erase": "null",
                                "columns": {"customer_id": {"erase": "null"},
                                            "address": {"category": "user.contact.address", "erase": "hash"}}}
    assert "a column says erase: hash: give hash_key" in error(data)
    data["hash_key"] = {"env": "SHOP_HASH_KEY"}
    assert parse_spec(data).uses_hash
    data["hash_key"] = {"env": "A", "setting": "b"}
    assert "hash_key names one of env or setting" in error(data)


def test_subject_errors() -> None:
    data = copy.deepcopy(BASE)
    data["subject"]["table"] = "clients"
    assert "subject.table 'clients' is not described under tables" in error(data)
    data = copy.deepcopy(BASE)
    data["subject"]["identifiers"]["customer_id"] = "code"
    assert "table customers: identifier column code (customer_id) is not described under columns" in error(data)
    data = copy.deepcopy(BASE)
    data["subject"]["identifiers"]["passport"] = "passport"
    assert "subject.identifiers.passport" in error(data)
    data = copy.deepcopy(BASE)
    data["tables"]["customers"] = {"erase": "null", "columns": {
        "email": {"category": "user.contact.email", "erase": "retain",
                  "retain": {"legal_basis": "a law", "period": "5 years"}},
        "phone": "user.contact.phone_number"}}
    assert "identifier column email is retained: a second erasure would find the subject again" in error(data)


def test_unknown_keys_and_bad_yaml_are_one_line(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["tables"]["orders"]["colums"] = {}
    assert "tables.orders.colums: Extra inputs are not permitted" in error(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: {name: shop\nsubject: [", encoding="utf-8")
    with pytest.raises(SpecError, match=r"^bad.yaml: not valid YAML at line \d+$"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n", encoding="utf-8")
    with pytest.raises(SpecError, match="not a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_quote_ident() -> None:
    assert quote_ident("members") == '"members"'
    assert quote_ident('a"b') == '"a""b"'


def test_a_rectify_field_mapped_twice_is_refused() -> None:
    data = copy.deepcopy(BASE)
    data["tables"]["customers"]["rectify"] = {"email": "email"}
    data["tables"]["orders"]["columns"]["contact_email"] = "user.contact.email"
    data["tables"]["orders"]["rectify"] = {"user.contact.email": "contact_email"}
    assert ("table orders: rectify field user.contact.email is mapped already (column customers.email): map each "
            "field to one column of one table") in error(data)
    del data["tables"]["customers"]["rectify"]
    assert parse_spec(data).actions() == (Action.export, Action.erase, Action.rectify)


def test_a_deleted_tables_link_to_another_row_may_be_nulled() -> None:
    """A gift's recipient: the gift is the giver's; the link is cut when the recipient is erased."""
    data = spec_with(gifts={"relation": {"column": "customer_id", "references": "customers"},
                            "columns": {"message": "user.content.private", "to_customer_id": {"erase": "null"}}})
    gifts = parse_spec(data).tables["gifts"]
    assert gifts.deletes and gifts.strategy("to_customer_id") == "null" and gifts.strategy("message") == "delete"
