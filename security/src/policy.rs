//! Who may call what.
//!
//! | needs | gRPC methods, HTTP routes | granted to |
//! |---|---|---|
//! | nothing | `grpc.health.v1.Health/*`, server reflection, `/ui` (the page holds no data) | anyone |
//! | [`Access::Read`] | `JobService` `GetJob`, `ListJobs`, `WatchJob`, `ListCheckpoints`; `InferenceService/*`; `/metrics`, `/api/*`, `/v1/completions` | admin, submit, read |
//! | [`Access::Submit`] | `JobService` `SubmitJob`, `CancelJob` | admin, submit |
//! | [`Access::Worker`] | `WorkerService/*` | worker |
//! | [`Access::Admin`] | any method not named above | admin |
//!
//! A worker token is only good for `WorkerService`, and no operator token (not even admin)
//! can register as a worker: a leaked worker token cannot touch jobs, and an operator cannot
//! slip a process into the cluster that receives other people's data by mistake.

use crate::Role;

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Open,
    Read,
    Submit,
    Worker,
    Admin,
}

impl Access {
    /// What a gRPC method (`/package.Service/Method`) needs.
    pub fn of_grpc(path: &str) -> Access {
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        match service {
            "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
            "ferrite.v1.JobService" => match method {
                "SubmitJob" | "CancelJob" => Access::Submit,
                "GetJob" | "ListJobs" | "WatchJob" | "ListCheckpoints" => Access::Read,
                _ => Access::Admin,
            },
            "ferrite.v1.WorkerService" => Access::Worker,
            "ferrite.v1.InferenceService" => Access::Read,
            _ => Access::Admin,
        }
    }

    /// Whether `role` may do what this needs.
    pub fn granted_to(self, role: Role) -> bool {
        match self {
            Access::Open => true,
            Access::Read => matches!(role, Role::Admin | Role::Submit | Role::Read),
            Access::Submit => matches!(role, Role::Admin | Role::Submit),
            Access::Worker => role == Role::Worker,
            Access::Admin => role == Role::Admin,
        }
    }

    /// The roles that grant this, for error messages ("needs role submit or admin").
    pub fn roles(self) -> String {
        let names: Vec<&str> =
            Role::ALL.into_iter().filter(|r| self.granted_to(*r)).map(Role::as_str).collect();
        names.join(" or ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_need_what_the_table_says() {
        use Access::*;
        let cases = [
            ("/grpc.health.v1.Health/Check", Open),
            ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Open),
            ("/ferrite.v1.JobService/SubmitJob", Submit),
            ("/ferrite.v1.JobService/CancelJob", Submit),
            ("/ferrite.v1.JobService/WatchJob", Read),
            ("/ferrite.v1.JobService/SomethingNew", Admin),
            ("/ferrite.v1.WorkerService/Attach", Worker),
            ("/ferrite.v1.InferenceService/Generate", Read),
            ("/other.Service/X", Admin),
            ("garbage", Admin),
        ];
        for (path, need) in cases {
            assert_eq!(Access::of_grpc(path), need, "{path}");
        }
    }

    #[test]
    fn workers_and_operators_stay_apart() {
        assert!(!Access::Submit.granted_to(Role::Worker));
        assert!(!Access::Read.granted_to(Role::Worker));
        for operator in [Role::Admin, Role::Submit, Role::Read] {
            assert!(!Access::Worker.granted_to(operator), "{operator}");
        }
        assert!(!Access::Submit.granted_to(Role::Read));
        assert_eq!(Access::Submit.roles(), "admin or submit");
    }
}
