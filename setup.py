"""Build script: everything is in setup.cfg except the optional C extension.

``tigertunnel.wire._hotpath`` is the compiled per-frame data path. It is
optional: where it cannot be built (no C compiler, no Python headers) the
package installs without it and runs on its pure-Python modules.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tigertunnel.wire._hotpath",
            sources=["tigertunnel/wire/_hotpath.c"],
            extra_compile_args=["-std=c99", "-Wall", "-Wextra",
                                "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers",
                                "-Wno-cast-function-type"],
            optional=True,
        ),
    ],
)
