"""A tiny ELF relocatable object that kmod accepts as a kernel module: just a real `.modinfo` section.

It cannot be loaded (there is no code), but `depmod` indexes it and `modinfo -F version nvidia` reads it,
which is all the deploys ask of the on-disk module.
"""

import struct


def modinfo_object(fields: dict[str, str]) -> bytes:
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    header_size, section_header_size = 64, 64
    modinfo_off = header_size
    shstrtab_off = modinfo_off + len(modinfo)
    sh_off = (shstrtab_off + len(shstrtab) + 7) & ~7
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little endian, SysV
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0,
                                 header_size, 0, 0, section_header_size, 3, 2)

    def section(name: int, kind: int, flags: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, flags, 0, offset, size, 0, 0, 1, 0)

    sections = (bytes(section_header_size)
                + section(1, 1, 2, modinfo_off, len(modinfo))            # .modinfo: PROGBITS, ALLOC
                + section(10, 3, 0, shstrtab_off, len(shstrtab)))       # .shstrtab: STRTAB
    body = header + modinfo + shstrtab
    return body + bytes(sh_off - len(body)) + sections
