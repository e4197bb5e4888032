"""``3dino demo``: the whole chain on bundled real scans (:mod:`.chain`), its HTML report (:mod:`.report`) and
the example datasets it and the tests build (:mod:`.examples`)."""
