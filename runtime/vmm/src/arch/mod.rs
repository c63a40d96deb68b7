//! The x86_64 guest memory layout and the 64-bit Linux boot protocol.

pub mod mptable;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Guest-physical layout.
pub mod layout {
    /// The GDT.
    pub const GDT: u64 = 0x500;
    /// The IDT (empty).
    pub const IDT: u64 = 0x520;
    /// The Linux zero page (boot_params).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// The initial stack pointer.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// Page tables: PML4, PDPT, PD.
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// The kernel command line.
    pub const CMDLINE: u64 = 0x20000;
    pub const CMDLINE_MAX: usize = 4096;
    /// The MP table, at the end of conventional memory (EBDA).
    pub const MPTABLE: u64 = 0x9fc00;
    /// End of the low RAM region.
    pub const LOW_RAM_END: u64 = 0x9fc00;
    /// Where the kernel is loaded.
    pub const HIMEM: u64 = 0x100000;
    /// virtio-mmio windows: one page each from here.
    pub const MMIO_BASE: u64 = 0xd000_0000;
    pub const MMIO_SIZE: u64 = 0x1000;
    /// The first IRQ of virtio-mmio devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
    pub const MMIO_IRQ_BASE: u32 = 5;
    /// The serial port's IRQ.
    pub const SERIAL_IRQ: u32 = 4;
}

/// Errors of the boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing boot structures into guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("the initramfs ({0} bytes) does not fit in guest memory")]
    InitrdTooBig(u64),
    #[error("the MP table")]
    MpTable(#[from] mptable::MpTableError),
}

/// GDT entry from flags, base and limit (the classic packed form).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// The boot GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Writes the GDT, an empty IDT and identity-mapped page tables for the first 1 GiB
/// (2 MiB pages), which is all the 64-bit boot protocol needs until the kernel builds its own.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT))?;
    mem.write_obj(layout::PDPT | 0x03, GuestAddress(layout::PML4))?;
    mem.write_obj(layout::PD | 0x03, GuestAddress(layout::PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PD + i * 8))?;
    }
    Ok(())
}

/// Where an initramfs of `size` bytes goes: page-aligned, as high as possible below the
/// end of memory (and below 4 GiB, which a small VM always is).
pub fn initrd_addr(mem_size: u64, size: u64) -> Result<GuestAddress, BootError> {
    let top = mem_size.min(1 << 32);
    let start = top.checked_sub(size).ok_or(BootError::InitrdTooBig(size))? & !0xfff;
    if start < layout::HIMEM + (16 << 20) {
        return Err(BootError::InitrdTooBig(size));
    }
    Ok(GuestAddress(start))
}

/// Fills and writes the zero page: command line, initramfs, e820 map.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    // SAFETY: boot_params is a plain-old-data C struct of integers and arrays; all-zero is
    // its documented initial state.
    let mut p: boot_params = unsafe { std::mem::zeroed() };
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    p.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    p.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr.raw_value() as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let e820 = [
        (0u64, layout::LOW_RAM_END, 1u32),
        (layout::HIMEM, mem_size - layout::HIMEM, 1u32),
    ];
    for (i, (addr, size, typ)) in e820.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *typ,
        };
    }
    p.e820_entries = e820.len() as u8;
    // SAFETY: `p` is a live, fully initialized repr(C) POD value; viewing its bytes for the
    // duration of this call is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&p as *const boot_params).cast::<u8>(),
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(layout::ZERO_PAGE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_known_encodings() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn initrd_goes_high_and_refuses_what_does_not_fit() {
        let a = initrd_addr(256 << 20, 10_000).unwrap();
        assert_eq!(a.raw_value() % 4096, 0);
        assert!(a.raw_value() + 10_000 <= 256 << 20);
        assert!(initrd_addr(64 << 20, 60 << 20).is_err());
    }

    #[test]
    fn boot_tables_identity_map() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        assert_eq!(pml4, layout::PDPT | 0x03);
        let pdpt: u64 = mem.read_obj(GuestAddress(layout::PDPT)).unwrap();
        assert_eq!(pdpt, layout::PD | 0x03);
        // 512 present, writable 2 MiB pages mapping the first GiB onto itself.
        for i in [0u64, 1, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(layout::PD + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PD[{i}]");
        }
    }

    #[test]
    fn the_zero_page_has_the_command_line_initramfs_and_memory_map() {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let initrd = (GuestAddress(48 << 20), 1234);
        write_boot_params(&mem, size, 42, Some(initrd)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        let hdr = p.hdr;
        assert_eq!(
            (hdr.boot_flag, hdr.header, hdr.type_of_loader),
            (0xaa55, 0x5372_6448, 0xff)
        );
        assert_eq!(
            (hdr.cmd_line_ptr, hdr.cmdline_size),
            (layout::CMDLINE as u32, 42)
        );
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (48 << 20, 1234));
        assert_eq!(p.e820_entries, 2);
        let e: Vec<(u64, u64, u32)> = p.e820_table[..2]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            e,
            [
                (0, layout::LOW_RAM_END, 1),
                (layout::HIMEM, size - layout::HIMEM, 1)
            ]
        );
    }
}
