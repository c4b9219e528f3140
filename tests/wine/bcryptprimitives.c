/* Rust's std (1.78+) imports ProcessPrng from bcryptprimitives.dll, which Wine 8.0 lacks, so
 * every Rust .exe fails to load there (c0000135). This stand-in exports ProcessPrng on top of
 * advapi32's RtlGenRandom (SystemFunction036), which Wine has. Test setup only: it goes into a
 * throwaway Wine prefix, never into a release. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
