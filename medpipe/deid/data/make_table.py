"""Generate ``e1_1.json`` (PS3.15 Table E.1-1 as data) from two permissively licensed PyPI packages.

Run by hand when the standard changes; the output is committed, medpipe never runs this at run time::

    python -m venv /tmp/gen && /tmp/gen/bin/pip install --no-deps dicom-anonymizer==2.1.0 dicom-standard==0.1.0 \\
        && /tmp/gen/bin/pip install pydicom==3.0.2
    /tmp/gen/bin/python medpipe/deid/data/make_table.py /tmp/gen medpipe/deid/data/e1_1.json

Sources (both are machine-readable copies of DICOM PS3.15 Annex E, Table E.1-1):

* **Basic Profile column**: ``dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py`` of
  KitwareMedical's ``dicom-anonymizer`` 2.1.0 (BSD-3-Clause), its maintainers' copy of the 2026c edition:
  655 attributes and tag masks with their action codes (D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*).
* **Option columns** (Retain Safe Private, Retain UIDs, Retain Device Identity, Retain Institution Identity,
  Retain Patient Characteristics, Retain Longitudinal Temporal Information with Full / Modified Dates,
  Clean Descriptors, Clean Structured Content, Clean Graphics): ``standard/confidentiality_profile_attributes.json``
  of Innolitics' ``dicom-standard`` 0.1.0 (MIT), parsed from the standard's web edition current on 2020-04-07
  (432 attributes). The same package's ``sops.json``, ``ciod_to_modules.json`` and ``module_to_attributes.json``
  give the Type of each attribute in each IOD (used to resolve the combined codes Z/D, X/Z, X/D, X/Z/D).
* Attributes added to the table after 2020 have no option columns in the 2020 copy. For two columns the
  standard follows a rule that we apply to them, recorded per row under ``"derived"``: Retain UIDs keeps (K)
  every attribute whose basic action is U, and the two Retain Longitudinal options keep (K) / modify (C) every
  attribute of VR DA, DT or TM except Patient's Birth Date and Birth Time (as the 2020 rows do). For the other
  options a newer attribute keeps its basic action (errs towards removal).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import sys
from pathlib import Path

OPTION_COLUMNS = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_full_dates",
    "rtnLongModifDatesOpt": "retain_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}
CATEGORIES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}
#: combined codes whose choice depends on the attribute's Type in the IOD (and X: see the engine's docstring)
TYPED_CODES = {"Z/D", "X/Z", "X/D", "X/Z/D"}
BIRTH = {"(0010,0030)", "(0010,0032)"}


def _tag_text(t: tuple[int, ...]) -> str:
    """(group, element[, group mask, element mask]) -> '(0008,0050)' or '(50xx,xxxx)'."""
    if len(t) == 2:
        return f"({t[0]:04X},{t[1]:04X})"
    group, elem, gmask, emask = t
    g = "".join(c if (gmask >> (12 - 4 * i)) & 0xF else "x" for i, c in enumerate(f"{group:04X}"))
    e = "".join(c if (emask >> (12 - 4 * i)) & 0xF else "x" for i, c in enumerate(f"{elem:04X}"))
    return f"({g},{e})"


def _load_module(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dicomfields", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(prefix: Path, out: Path) -> None:
    from pydicom.datadict import dictionary_description, dictionary_keyword, dictionary_VR

    site = next(prefix.glob("lib/python3*/site-packages"))
    fields = _load_module(site / "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py")
    std = prefix / "standard"
    old = {row["tag"]: row for row in json.loads((std / "confidentiality_profile_attributes.json").read_text())}

    comments = {}  # '(0008,1301)' -> the attribute name in the source's comment
    pattern = r"\(\s*0x([0-9A-Fa-f]{4}),\s*0x([0-9A-Fa-f]{4})\s*\),?\s*#\s*(.+)"
    for m in re.finditer(pattern, Path(fields.__file__).read_text()):
        comments[f"({m.group(1).upper()},{m.group(2).upper()})"] = m.group(3).strip()
    rows: dict[str, dict[str, object]] = {}
    for cat, code in CATEGORIES.items():
        for t in getattr(fields, cat):
            tag = _tag_text(t)
            if tag in rows:
                raise SystemExit(f"{tag} listed twice")
            rows[tag] = {"tag": tag, "basic": code}
    for tag, row in rows.items():
        masked = "x" in tag
        vr = ""
        if not masked:
            num = int(tag[1:5] + tag[6:10], 16)
            try:
                row["keyword"] = dictionary_keyword(num)
                row["name"] = dictionary_description(num)
                vr = dictionary_VR(num)
            except KeyError:  # newer than this pydicom's dictionary: the name from the source's comment
                row["keyword"], row["name"] = "", comments.get(tag, "")
        else:
            row["keyword"] = ""
            row["name"] = next((r["name"] for k, r in old.items() if k.lower() == tag.lower()), "")
        src = next((r for k, r in old.items() if k.lower() == tag.lower()), None)
        options: dict[str, str] = {}
        derived: list[str] = []
        if src is not None:
            options = {OPTION_COLUMNS[c]: src[c] for c in OPTION_COLUMNS if c in src}
        else:
            if "U" in str(row["basic"]).replace("U*", "U"):
                options["retain_uids"] = "K"
                derived.append("retain_uids")
            if vr in ("DA", "DT", "TM") and tag not in BIRTH:
                options["retain_full_dates"] = "K"
                options["retain_modified_dates"] = "C"
                derived += ["retain_full_dates", "retain_modified_dates"]
        if options:
            row["options"] = options
        if derived:
            row["derived"] = derived
        row["vr"] = vr
    # private attributes: the table's "(gggg,eeee) where gggg is odd" row
    priv = next(r for r in old.values() if "odd" in r["tag"].lower())
    private = {"tag": "(odd,xxxx)", "basic": priv["basicProfile"], "keyword": "", "name": "Private Attributes",
               "vr": "", "options": {OPTION_COLUMNS[c]: priv[c] for c in OPTION_COLUMNS if c in priv}}

    # Types of the typed-code attributes per SOP class (most demanding Type over the IOD's modules, top level)
    sops = json.loads((std / "sops.json").read_text())
    ciod_ids = {c["name"]: c["id"] for c in json.loads((std / "ciods.json").read_text())}
    modules: dict[str, set[str]] = {}
    for m in json.loads((std / "ciod_to_modules.json").read_text()):
        modules.setdefault(m["ciodId"], set()).add(m["moduleId"])
    wanted = {tag for tag, r in rows.items() if r["basic"] in TYPED_CODES or r["basic"] == "X"}
    types: dict[tuple[str, str], str] = {}  # (module, tag) -> type
    for a in json.loads((std / "module_to_attributes.json").read_text()):
        if a["path"].count(":") == 1 and a["tag"] in wanted:
            key = (a["moduleId"], a["tag"])
            t = str(a["type"])
            types[key] = min(types.get(key, "3"), t[0] if t[0] in "123" else "3")
    iod_types: dict[str, dict[str, list[str]]] = {}
    known_sops = []
    for sop in sops:
        ciod = ciod_ids.get(sop["ciod"])
        if ciod is None or ciod not in modules:
            continue
        known_sops.append(sop["id"])
        for tag in sorted(wanted):
            t = min((types.get((m, tag), "3") for m in modules[ciod]), default="3")
            if t in ("1", "2"):
                iod_types.setdefault(tag, {}).setdefault(t, []).append(sop["id"])

    doc = {
        "title": "DICOM PS3.15 Annex E, Table E.1-1: Application Level Confidentiality Profile Attributes",
        "generated": dt.date.today().isoformat(),
        "generator": "medpipe/deid/data/make_table.py",
        "sources": {
            "basic": "DICOM PS3.15 2026c, Table E.1-1 'Basic Prof.' column, as dicom-anonymizer 2.1.0 "
                     "(KitwareMedical, BSD-3-Clause) ships it: dicomanonymizer/dicom_anonymization_databases/"
                     "dicomfields_2026c.py",
            "options": "DICOM PS3.15 web edition current on 2020-04-07, Table E.1-1 option columns, as "
                       "dicom-standard 0.1.0 (Innolitics, MIT) ships it: standard/confidentiality_profile_attributes.json",
            "derived": "rows added after 2020: retain_uids = K where the basic action is U; retain_full_dates = K and "
                       "retain_modified_dates = C for VR DA/DT/TM except Patient's Birth Date/Time (the rule the "
                       "2020 rows follow)",
            "iod_types": "dicom-standard 0.1.0 sops.json, ciods.json, ciod_to_modules.json, module_to_attributes.json "
                         "(PS3.3 as of 2020-04-07): the SOP classes in whose IOD an attribute with code X or a "
                         "combined code is Type 1 (1, 1C) or 2 (2, 2C) at the top level",
        },
        "option_columns": list(OPTION_COLUMNS.values()),
        "attributes": sorted(rows.values(), key=lambda r: str(r["tag"])) + [private],
        "iod_types": iod_types,
        "iod_sop_classes": sorted(known_sops),
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(rows) + 1} rows, {len(iod_types)} typed attributes over {len(known_sops)} SOP classes -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
