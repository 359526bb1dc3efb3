"""Validates custom resources against the openAPIV3Schema of their CRDs.

usage: crd_validate.py CRD.yaml... -- RESOURCES.yaml...

Every document of the resource files whose apiVersion and kind a given CRD
serves is checked against that version's schema, strictly as the API
server treats a structural schema: a field the schema does not declare is
an error (the API server would prune it silently, losing the setting),
unless the schema says x-kubernetes-preserve-unknown-fields. `metadata` is
checked by the API server's own rules, not here. Prints one line per
problem and exits 1 if there is any; otherwise prints how many resources
were checked. A resource of a kind no CRD serves is an error too, so that a
typo in apiVersion cannot skip the check. jsonschema and PyYAML come with
kubernetes-validate (tests/requirements.txt).
"""

import sys

import jsonschema
import yaml


def strict(schema):
    """The schema with additionalProperties: false wherever properties are
    declared and unknown fields are not explicitly preserved."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def main(argv):
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    schemas = {}
    for path in argv[:split]:
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    # metadata is the API server's (ObjectMeta), not the CRD's.
                    schema.get("properties", {}).pop("metadata", None)
                    schema["properties"]["metadata"] = {"type": "object"}
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    problems, checked = [], 0
    for path in argv[split + 1 :]:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                key = (doc.get("apiVersion"), doc.get("kind"))
                name = f"{path}: {key[1]}/{doc.get('metadata', {}).get('name')}"
                schema = schemas.get(key)
                if schema is None:
                    problems.append(f"{name}: no CRD serves {key[0]} {key[1]}")
                    continue
                checked += 1
                validator = jsonschema.Draft7Validator(schema)
                for error in validator.iter_errors(doc):
                    where = "/".join(str(p) for p in error.absolute_path) or "(top)"
                    problems.append(f"{name}: {where}: {error.message}")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"checked {checked}")


if __name__ == "__main__":
    main(sys.argv[1:])
