//! The port filter (`port_filter`, bpf/port_filter.h, docs/datapath.md "Port filter") as the
//! agent and the tests see it: mapped into memory (a `BPF_F_MMAPABLE` array of one value), its
//! bits read and set with atomics, as the programs set them, so that a bit the agent sets can never
//! undo one a program set meanwhile (a map update of the value would).

use std::sync::atomic::{AtomicU64, Ordering};

use libbpf_rs::MapHandle;

use crate::error::Result;
use crate::maps::{PORT_FILTER_WORDS, PortFilterValue};
use crate::nat_table::Mapping;

/// Which of the filter's three bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A connection's backend port: a reply's source port, a forward packet's destination
    /// port (the SNAT table's and `conns`' lookups).
    Backend,
    /// A service port (`svc_ports`' lookups).
    Service,
    /// The node's port of a translation: a reply's destination port (`snat_rev`'s lookups).
    Snat,
}

/// `port_filter`, mapped.
#[derive(Debug)]
pub struct PortFilter {
    mapping: Mapping,
}

impl PortFilter {
    /// Maps `port_filter` (its layout checked).
    pub fn open(handle: &MapHandle) -> Result<PortFilter> {
        Ok(PortFilter {
            mapping: Mapping::new(handle, size_of::<PortFilterValue>())?,
        })
    }

    fn word(&self, kind: PortKind, port: u16) -> &AtomicU64 {
        let value = self.mapping.element::<PortFilterValue>(0);
        let index = usize::from(port >> 6);
        debug_assert!(index < PORT_FILTER_WORDS);
        // SAFETY: the value is element 0 of a live mapping of one PortFilterValue (checked in
        // Mapping::new); index < PORT_FILTER_WORDS; the words are 8-byte aligned (the mapping
        // is page-aligned); AtomicU64 has u64's layout.
        unsafe {
            let word = match kind {
                PortKind::Backend => std::ptr::addr_of_mut!((*value).backend[index]),
                PortKind::Service => std::ptr::addr_of_mut!((*value).service[index]),
                PortKind::Snat => std::ptr::addr_of_mut!((*value).snat[index]),
            };
            AtomicU64::from_ptr(word)
        }
    }

    /// Sets the port's bit (sequentially consistent: before the entry the caller writes next).
    pub fn add(&self, kind: PortKind, port: u16) {
        let bit = 1u64 << (port & 63);
        let word = self.word(kind, port);
        if word.load(Ordering::SeqCst) & bit == 0 {
            word.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Whether the port's bit is set.
    pub fn contains(&self, kind: PortKind, port: u16) -> bool {
        self.word(kind, port).load(Ordering::SeqCst) & (1u64 << (port & 63)) != 0
    }

    /// Every port whose bit is set, in order.
    pub fn ports(&self, kind: PortKind) -> Vec<u16> {
        (0..=u16::MAX).filter(|&p| self.contains(kind, p)).collect()
    }
}
