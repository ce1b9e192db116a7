-- User names are compared without case (issue 20, finding 7): `Alice` and
-- `alice` are one account. New names are stored in lower case; this index
-- also keeps a name from before that differs only in case from being taken.
CREATE UNIQUE INDEX users_username_folded ON users (lower(username));
