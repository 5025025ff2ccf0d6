//! eBPF datapath programs and the `#[repr(C)]` mirrors of their maps (placeholder).
