"""Fermata's development harness — everything that exists only so the tests and the local demo
can run, kept out of the product packages (``fermata_api``, ``fermata_operator``,
``fermata_trainer``) and out of the container images.

* :mod:`fermata_dev.cluster` — a real control plane on loopback (``LocalControlPlane``);
* :mod:`fermata_dev.kubelet` — the test kubelet that plays GPU nodes (``LocalKubelet``);
* :mod:`fermata_dev.local_mode` — ``fermata local up|down|status`` (the supervisor);
* :mod:`fermata_dev.commands` — registers ``local`` with the product CLI through the
  ``fermata.commands`` entry-point group;
* :mod:`fermata_dev.demo` — ``make demo``;
* :mod:`fermata_dev.synthetic` — synthetic MagnaTagATune-like data.

The product never imports this package.
"""
