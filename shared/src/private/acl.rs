//! The Windows verdict over a file's DACL, as plain data so every OS can test it.

use super::Exposure;

/// `ACCESS_ALLOWED_ACE_TYPE`.
pub const ACCESS_ALLOWED: u8 = 0;
/// `ACCESS_DENIED_ACE_TYPE`.
pub const ACCESS_DENIED: u8 = 1;

/// Access bits that let someone read, change or take a file: `FILE_READ_DATA`,
/// `FILE_WRITE_DATA`, `FILE_APPEND_DATA`, `FILE_READ_EA`, `FILE_WRITE_EA`, `DELETE`,
/// `WRITE_DAC`, `WRITE_OWNER` and the four generic rights. Attribute reads and `SYNCHRONIZE`
/// alone are harmless.
pub const SENSITIVE: u32 = 0x0001
    | 0x0002
    | 0x0004
    | 0x0008
    | 0x0010
    | 0x0001_0000
    | 0x0004_0000
    | 0x0008_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x8000_0000;

/// Who an ACE is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trustee {
    /// The file's owner, or the user this process runs as.
    Me,
    /// `SYSTEM` (S-1-5-18) or `Administrators` (S-1-5-32-544): they can read any file anyway.
    Machine,
    /// Anyone else, by SID string.
    Other(String),
}

/// One ACE, as far as the verdict needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ace {
    /// The ACE type ([`ACCESS_ALLOWED`], [`ACCESS_DENIED`], or another).
    pub kind: u8,
    /// Who.
    pub trustee: Trustee,
    /// The access mask.
    pub mask: u32,
}

/// Who else may open a file with this DACL (`None`: a NULL DACL, which lets everyone in).
pub fn exposure(dacl: Option<&[Ace]>) -> Option<Exposure> {
    let Some(aces) = dacl else {
        return Some(Exposure("it has no ACL at all, so everyone may open it".into()));
    };
    let others: Vec<&str> = aces
        .iter()
        .filter(|a| a.kind == ACCESS_ALLOWED && a.mask & SENSITIVE != 0)
        .filter_map(|a| match &a.trustee {
            Trustee::Other(sid) => Some(sid.as_str()),
            Trustee::Me | Trustee::Machine => None,
        })
        .collect();
    (!others.is_empty())
        .then(|| Exposure(format!("its ACL lets {} read or change it", others.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ace(kind: u8, trustee: Trustee, mask: u32) -> Ace {
        Ace { kind, trustee, mask }
    }

    #[test]
    fn only_me_and_the_machine_may_have_access() {
        let mine = [
            ace(ACCESS_ALLOWED, Trustee::Me, 0x001f_01ff),
            ace(ACCESS_ALLOWED, Trustee::Machine, 0x001f_01ff),
        ];
        assert_eq!(exposure(Some(&mine)), None);
        assert_eq!(exposure(Some(&[])), None, "an empty DACL lets nobody in");
    }

    #[test]
    fn any_other_sid_with_a_sensitive_right_is_exposure() {
        let users = "S-1-5-32-545".to_owned();
        for mask in [0x0001, 0x0002, 0x0004, 0x0004_0000, 0x8000_0000, 0x1000_0000, 0x0012_0089] {
            let aces = [
                ace(ACCESS_ALLOWED, Trustee::Me, 0x001f_01ff),
                ace(ACCESS_ALLOWED, Trustee::Other(users.clone()), mask),
            ];
            let e = exposure(Some(&aces)).unwrap_or_else(|| panic!("mask {mask:#x} missed"));
            assert_eq!(e.0, "its ACL lets S-1-5-32-545 read or change it");
        }
        let everyone = [ace(ACCESS_ALLOWED, Trustee::Other("S-1-1-0".into()), 0x001f_01ff)];
        assert!(exposure(Some(&everyone)).is_some());
        assert!(exposure(None).unwrap().0.contains("no ACL at all"));
    }

    #[test]
    fn harmless_rights_and_deny_aces_are_not_exposure() {
        let other = Trustee::Other("S-1-5-11".into());
        // FILE_READ_ATTRIBUTES | READ_CONTROL | SYNCHRONIZE: what Windows gives Everyone often.
        let aces = [
            ace(ACCESS_ALLOWED, other.clone(), 0x0080 | 0x0002_0000 | 0x0010_0000),
            ace(ACCESS_DENIED, other.clone(), 0x001f_01ff),
            ace(9, other, 0x001f_01ff), // an audit or callback ACE grants nothing here
        ];
        assert_eq!(exposure(Some(&aces)), None);
    }
}
