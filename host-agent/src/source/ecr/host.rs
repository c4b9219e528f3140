//! Which registries are Amazon ECR, and where their tokens come from.
//!
//! Private ECR, as amazon-ecr-credential-helper 0.12 matches it, but case-insensitive (DNS
//! names are): `ACCOUNT.dkr.ecr[-fips].REGION.SUFFIX` or the dual-stack
//! `ACCOUNT.dkr-ecr[-fips].REGION.SUFFIX`, with SUFFIX one of `amazonaws.com`,
//! `amazonaws.com.cn`, `amazonaws.eu`, `on.aws`, `on.amazonwebservices.com.cn`, and the ISO
//! partitions (`sc2s.sgov.gov`, `c2s.ic.gov`, `cloud.adc-e.uk`, `csp.hci.ic.gov`). ECR Public:
//! `public.ecr.aws` and `ecr-public.aws.com`, always served from `us-east-1`.
//!
//! Input handling follows the reference: one `https://` is stripped, the port and path are
//! ignored, `http://` is refused. The server string is parsed by [`Registry::parse`] first, so
//! what is ECR here is the same registry the policy matched; only regions that exist in the
//! suffix's partition are accepted.

use finch_shared::registry::Registry;

/// The region ECR Public's API lives in.
pub const PUBLIC_REGION: &str = "us-east-1";

/// An ECR registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EcrHost {
    /// A private registry.
    Private {
        /// The 12-digit account id.
        account: String,
        /// The region, lower-cased.
        region: String,
        /// A FIPS endpoint.
        fips: bool,
        /// The registry host, lower-cased (what a token is cached under and listed as).
        host: String,
    },
    /// ECR Public.
    Public {
        /// The registry host, lower-cased.
        host: String,
    },
}

/// The DNS suffixes of each partition and its regions. A region outside this list is not
/// ECR: a guest cannot make the agent build clients for regions that do not exist.
const PARTITIONS: &[(&[&str], &[&str])] = &[
    (
        &["amazonaws.com", "on.aws"],
        &[
            "us-east-1",
            "us-east-2",
            "us-west-1",
            "us-west-2",
            "af-south-1",
            "ap-east-1",
            "ap-east-2",
            "ap-south-1",
            "ap-south-2",
            "ap-southeast-1",
            "ap-southeast-2",
            "ap-southeast-3",
            "ap-southeast-4",
            "ap-southeast-5",
            "ap-southeast-6",
            "ap-southeast-7",
            "ap-northeast-1",
            "ap-northeast-2",
            "ap-northeast-3",
            "ca-central-1",
            "ca-west-1",
            "eu-central-1",
            "eu-central-2",
            "eu-west-1",
            "eu-west-2",
            "eu-west-3",
            "eu-south-1",
            "eu-south-2",
            "eu-north-1",
            "il-central-1",
            "me-south-1",
            "me-central-1",
            "mx-central-1",
            "sa-east-1",
            "us-gov-east-1",
            "us-gov-west-1",
        ],
    ),
    (&["amazonaws.com.cn", "on.amazonwebservices.com.cn"], &["cn-north-1", "cn-northwest-1"]),
    (&["amazonaws.eu"], &["eusc-de-east-1"]),
    (&["c2s.ic.gov"], &["us-iso-east-1", "us-iso-west-1"]),
    (&["sc2s.sgov.gov"], &["us-isob-east-1", "us-isob-west-1"]),
    (&["cloud.adc-e.uk"], &["eu-isoe-west-1"]),
    (&["csp.hci.ic.gov"], &["us-isof-south-1", "us-isof-east-1"]),
];

const PUBLIC_HOSTS: &[&str] = &["public.ecr.aws", "ecr-public.aws.com"];

/// Whether `region` is a region of the partition whose DNS suffix is `suffix`.
pub fn known_region(suffix: &str, region: &str) -> bool {
    PARTITIONS
        .iter()
        .any(|(suffixes, regions)| suffixes.contains(&suffix) && regions.contains(&region))
}

impl EcrHost {
    /// The registry `server` names, if it is ECR (parsed by [`Registry::parse`], the one
    /// parser of server names).
    pub fn parse(server: &str) -> Option<EcrHost> {
        EcrHost::of(&Registry::parse(server).ok()?)
    }

    /// `registry`, if it is ECR. Plain `http://` is refused, as the reference helper does.
    pub fn of(registry: &Registry) -> Option<EcrHost> {
        if registry.plain_http() {
            return None;
        }
        let host = registry.host();
        if PUBLIC_HOSTS.contains(&host) {
            return Some(EcrHost::Public { host: host.to_owned() });
        }
        let (account, rest) = host.split_once('.')?;
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let rest = rest.strip_prefix("dkr.ecr").or_else(|| rest.strip_prefix("dkr-ecr"))?;
        let (fips, rest) = match rest.strip_prefix("-fips") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let rest = rest.strip_prefix('.')?;
        let (region, suffix) = rest.split_once('.')?;
        if !known_region(suffix, region) {
            return None;
        }
        Some(EcrHost::Private {
            account: account.to_owned(),
            region: region.to_owned(),
            fips,
            host: host.to_owned(),
        })
    }

    /// The registry host.
    pub fn host(&self) -> &str {
        match self {
            EcrHost::Private { host, .. } | EcrHost::Public { host } => host,
        }
    }

    /// The region its token API is called in.
    pub fn region(&self) -> &str {
        match self {
            EcrHost::Private { region, .. } => region,
            EcrHost::Public { .. } => PUBLIC_REGION,
        }
    }

    /// The account id, for private registries.
    pub fn account(&self) -> Option<&str> {
        match self {
            EcrHost::Private { account, .. } => Some(account),
            EcrHost::Public { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(server: &str) -> (String, String, bool) {
        match EcrHost::parse(server) {
            Some(EcrHost::Private { account, region, fips, .. }) => (account, region, fips),
            other => panic!("{server}: {other:?}"),
        }
    }

    #[test]
    fn reference_helper_vectors() {
        // amazon-ecr-credential-helper's TestExtractRegistry: accepted…
        assert_eq!(
            private("123456789012.dkr.ecr.us-west-2.amazonaws.com"),
            ("123456789012".into(), "us-west-2".into(), false)
        );
        assert_eq!(
            private("https://123456789012.dkr.ecr.us-west-2.amazonaws.com"),
            ("123456789012".into(), "us-west-2".into(), false)
        );
        assert_eq!(
            private("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com"),
            ("123456789012".into(), "us-gov-west-1".into(), true)
        );
        assert_eq!(
            private("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/v2/blah/blah"),
            ("123456789012".into(), "cn-north-1".into(), false)
        );
        // …and rejected.
        assert_eq!(EcrHost::parse("http://123456789012.dkr.ecr.us-west-2.amazonaws.com"), None);
        assert_eq!(EcrHost::parse("foo.example.com"), None);
    }

    #[test]
    fn more_accepted_forms() {
        for (server, region, fips) in [
            ("123456789012.DKR.ECR.US-WEST-2.AMAZONAWS.COM", "us-west-2", false),
            ("123456789012.dkr.ecr.us-west-2.amazonaws.com:443", "us-west-2", false),
            ("https://123456789012.dkr.ecr.us-west-2.amazonaws.com:443/v2/", "us-west-2", false),
            ("123456789012.dkr-ecr.us-east-1.on.aws", "us-east-1", false),
            ("123456789012.dkr-ecr-fips.us-east-1.on.aws", "us-east-1", true),
            (
                "123456789012.dkr-ecr.cn-northwest-1.on.amazonwebservices.com.cn",
                "cn-northwest-1",
                false,
            ),
            ("123456789012.dkr.ecr.eusc-de-east-1.amazonaws.eu", "eusc-de-east-1", false),
            ("123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov", "us-iso-east-1", false),
            ("123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov", "us-isob-east-1", false),
            ("123456789012.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk", "eu-isoe-west-1", false),
            ("123456789012.dkr.ecr.us-isof-south-1.csp.hci.ic.gov", "us-isof-south-1", false),
            ("123456789012.dkr.ecr.us-gov-east-1.amazonaws.com", "us-gov-east-1", false),
        ] {
            assert_eq!(private(server), ("123456789012".into(), region.into(), fips), "{server}");
        }
        for public in ["public.ecr.aws", "https://PUBLIC.ECR.AWS/v2/", "ecr-public.aws.com:443"] {
            let h = EcrHost::parse(public).unwrap();
            assert!(matches!(h, EcrHost::Public { .. }), "{public}");
            assert_eq!(h.region(), "us-east-1");
        }
        assert_eq!(
            EcrHost::parse("123456789012.DKR.ECR.us-west-2.amazonaws.com").unwrap().host(),
            "123456789012.dkr.ecr.us-west-2.amazonaws.com"
        );
    }

    #[test]
    fn rejected_forms() {
        for server in [
            "",
            "12345678901.dkr.ecr.us-west-2.amazonaws.com",
            "1234567890123.dkr.ecr.us-west-2.amazonaws.com",
            "12345678901a.dkr.ecr.us-west-2.amazonaws.com",
            "123456789012.dkr.ecr.us-west-2.amazonaws.com.evil.com",
            "123456789012.dkr.ecr.us-west-2.example.com",
            "123456789012.ecr.us-west-2.amazonaws.com",
            "123456789012.dkr.ecr..amazonaws.com",
            "123456789012.dkr.ecr.-bad.amazonaws.com",
            "123456789012.dkr.ecr.us west.amazonaws.com",
            "123456789012.dkr.ecr-fipsx.us-west-2.amazonaws.com",
            "evil123456789012.dkr.ecr.us-west-2.amazonaws.com",
            "http://public.ecr.aws",
            "public.ecr.aws.evil.com",
            "notpublic.ecr.aws",
            "ftp://123456789012.dkr.ecr.us-west-2.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com:x.allowed.example",
            "public.ecr.aws:x.allowed.example",
            "123456789012.dkr.ecr.xx-fake-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-99.amazonaws.com",
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.cn",
        ] {
            assert_eq!(EcrHost::parse(server), None, "{server}");
        }
    }
}
