//! Typed async client for the kernel IPVS generic-netlink family (placeholder).
