variable "name" {
  description = "Name of the environment; prefixes every resource."
  type        = string
  default     = "kestrel"
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-central-1"
}

variable "kubernetes_version" {
  description = "EKS version (the chart supports 1.33 and later)."
  type        = string
  default     = "1.33"
}

variable "vpc_cidr" {
  description = "The VPC's address range; three private and three public subnets are carved from it."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zones" {
  description = "Three zones: the brokers, NATS and PostgreSQL spread one node per zone."
  type        = list(string)
  default     = ["eu-central-1a", "eu-central-1b", "eu-central-1c"]
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint (operators, CI)."
  type        = list(string)
  validation {
    condition     = length(var.api_allowed_cidrs) > 0 && !contains(var.api_allowed_cidrs, "0.0.0.0/0")
    error_message = "Name the operators' CIDRs; the whole internet (0.0.0.0/0) may not reach the cluster's API."
  }
}

variable "node_instance_type" {
  description = "Instance type of the platform's node group."
  type        = string
  default     = "m7i.xlarge"
}

variable "node_count" {
  description = "Nodes in the platform's node group (min, desired, max)."
  type        = object({ min = number, desired = number, max = number })
  default     = { min = 3, desired = 3, max = 9 }
}

variable "profile" {
  description = "The chart's values profile: small, ha or 500k."
  type        = string
  default     = "ha"
}

variable "image_repository" {
  description = "Registry path of the services' image."
  type        = string
}

variable "image_digest" {
  description = "The image's digest (sha256:...)."
  type        = string
}

variable "device_cidrs" {
  description = "CIDRs devices connect from (the MQTT load balancer's source ranges)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}
