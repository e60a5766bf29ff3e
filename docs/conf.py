"""Sphinx configuration of tigertunnel's documentation (``tox -e docs``).

The build runs with ``-W --keep-going -n``: every warning fails it, and every
cross-reference, the package's docstrings included, must resolve. Names of
other packages cannot be resolved offline (no intersphinx), so they alone are
ignored below; a ``tigertunnel.*`` name that does not resolve is an error.
"""

import os

# The API reference documents the pure-Python data path, the reference the
# compiled twins of tigertunnel/wire/_hotpath.c follow: with the extension
# in use, those names are bound to its classes, which carry no docstrings.
os.environ["TIGERTUNNEL_PURE"] = "1"

import tigertunnel  # noqa: E402

project = "tigertunnel"
author = "the tigertunnel authors"
copyright = "the tigertunnel authors, ISC licence"
release = version = tigertunnel.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosectionlabel"]
#: A section is :ref:`page:Title`.
autosectionlabel_prefix_document = True

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    # A package's ``__all__`` re-exports its modules' names: each is
    # documented once, in the module that defines it.
    "ignore-module-all": True,
    # The modules' loggers (``log = logger(__name__)``).
    "exclude-members": "log",
}

nitpicky = True
#: Types of other packages (Twisted, cryptography, zope, the standard
#: library's typing internals): Sphinx has no inventory for them offline.
nitpick_ignore_regex = [
    (r"py:.*", r"(twisted|cryptography|zope|prometheus_client|hypothesis|OpenSSL|pyaegis|kyber_py)(\..*)?"),
    (r"py:.*", r"(typing|typing_extensions|collections|types|enum|abc|dataclasses|argparse|weakref"
               r"|signal|random|hmac|hashlib|configparser|gc|socket|ssl|io|os|struct|mmap|asyncio"
               r"|concurrent|logging|json|pathlib|subprocess|threading)(\..*)?"),
    # Twisted's interfaces, as autodoc prints them in signatures.
    (r"py:class", r"<InterfaceClass twisted\..*"),
]
#: Names of other packages that autodoc writes unqualified in signatures.
nitpick_ignore = [
    ("py:class", "Certificate"),
    ("py:class", "PrivateCertificate"),
    ("py:class", "CertificateOptions"),
    ("py:class", "IOpenSSLClientConnectionCreator"),
    ("py:exc", "usage.UsageError"),
]
