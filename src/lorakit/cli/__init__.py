"""The ``lorakit`` command line: thin commands over the library (see ``main``)."""
