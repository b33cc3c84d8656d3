"""Values checked the way Kubernetes checks them where they land (names, labels, quantities,
image references, resource names), as pydantic types whose JSON Schema the CRD inherits.

Every type carries a `maxLength`: the API server estimates the cost of CEL rules from it, and kopf
stores the whole spec in one annotation (≤ 256 KiB), so no string may be unbounded. The patterns
are RE2-compatible (the API server's regex engine) and Python-compatible (pydantic's).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

# apimachinery/pkg/util/validation: IsDNS1123Label, IsDNS1123Subdomain, IsQualifiedName, IsValidLabelValue.
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
QUALIFIED_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
# A label key: an optional DNS-1123 subdomain prefix (≤ 253) and "/", then a name part (≤ 63).
LABEL_KEY_PATTERN = rf"^({DNS1123_SUBDOMAIN}/)?{QUALIFIED_NAME_PART}$"
LABEL_KEY_MAX = 253 + 1 + 63
# The docker reference grammar (distribution/reference): [domain[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    rf"^({_COMPONENT}(:[0-9]+)?/)?{_COMPONENT}(/{_COMPONENT})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
# Kubernetes quantities as a pod's requests take them, without exponents: 8, 500m, 64Gi, 1.5.
CPU_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,3})?m?$"
MEMORY_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,3})?([kMGTPE]|[KMGTPE]i)?$"
# An extended resource (a GPU): domain-qualified, outside kubernetes.io (cpu, memory refused).
EXTENDED_RESOURCE_PATTERN = rf"^{DNS1123_SUBDOMAIN}/{QUALIFIED_NAME_PART}$"

DNS1123LabelName = Annotated[str, Field(min_length=1, max_length=63, pattern=rf"^{DNS1123_LABEL}$")]
DNS1123SubdomainName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=rf"^{DNS1123_SUBDOMAIN}$")
]
LabelValue = Annotated[str, Field(max_length=63, pattern=rf"^{LABEL_VALUE}$")]


def _label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if len(name) > 63 or len(prefix) > 253:
        raise ValueError(
            f"label key {key!r}: the name part may have at most 63 characters, the prefix 253"
        )
    return key


LabelKey = Annotated[
    str,
    Field(min_length=1, max_length=LABEL_KEY_MAX, pattern=LABEL_KEY_PATTERN),
    AfterValidator(_label_key),
]


def _extended_resource(name: str) -> str:
    domain = name.split("/", 1)[0]
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise ValueError(f"{name!r} is in the kubernetes.io domain, not an extended resource")
    return _label_key(name)


ExtendedResourceName = Annotated[
    str,
    Field(
        min_length=3,
        max_length=LABEL_KEY_MAX,
        pattern=EXTENDED_RESOURCE_PATTERN,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!self.matches('^([^/]*[.])?kubernetes[.]io/')",
                    "message": "an extended resource name is not in the kubernetes.io domain",
                }
            ]
        },
    ),
    AfterValidator(_extended_resource),
]
ImageReference = Annotated[str, Field(min_length=1, max_length=512, pattern=IMAGE_PATTERN)]
CpuQuantity = Annotated[str, Field(max_length=16, pattern=CPU_PATTERN)]
MemoryQuantity = Annotated[str, Field(max_length=20, pattern=MEMORY_PATTERN)]
