"""The rxe guest harness: a throw-away UML (or QEMU) guest with real soft-RoCE for CI and users
without RDMA hardware. ``rxe_vm.run`` and ``rdmakv rxe-vm`` are the entry points."""
