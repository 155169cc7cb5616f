variable "namespace" {
  description = "Namespace the release goes into (created here)."
  type        = string
  default     = "kestrel"
}

variable "release_name" {
  description = "Helm release name; the chart names its objects <release>-kestrel-*."
  type        = string
  default     = "k"
}

variable "chart_path" {
  description = "Path to the chart (the repository's helm/kestrel), or an OCI reference published by the CI workflow."
  type        = string
  default     = "../../../helm/kestrel"
}

variable "profile" {
  description = "Values profile of the chart: small, ha or 500k."
  type        = string
  default     = "ha"
  validation {
    condition     = contains(["small", "ha", "500k"], var.profile)
    error_message = "The profile must be small, ha or 500k."
  }
}

variable "image_repository" {
  description = "Registry path of the services' image built from the repository's Dockerfile."
  type        = string
}

variable "image_digest" {
  description = "The image's digest (sha256:...), as the release workflow prints it; pins what runs."
  type        = string
  validation {
    condition     = can(regex("^sha256:[0-9a-f]{64}$", var.image_digest))
    error_message = "The image digest must look like sha256:<64 hex digits>."
  }
}

variable "backup_bucket" {
  description = "Object storage for PostgreSQL base backups and WAL (s3://bucket/prefix)."
  type        = string
}

variable "backup_role_arn" {
  description = "IAM role (IRSA) the database pods assume to write backups; empty: credentials from a Secret."
  type        = string
  default     = ""
}

variable "storage_class" {
  description = "Storage class of the brokers' and the database's volumes."
  type        = string
  default     = ""
}

variable "load_balancer_source_ranges" {
  description = "CIDRs allowed to reach the MQTT load balancer (devices)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "extra_values" {
  description = "Further chart values (YAML), applied last."
  type        = string
  default     = ""
}
