-- Made-up members of the loyalty programme (reserved example domains: no real mailbox).
-- Nguyễn Thị Lan is the CRM's and billing's lan.nguyen@example.vn too.
INSERT INTO members (id, member_code, full_name, email, phone, date_of_birth, tier, joined_at) VALUES
    (1, 'TV000101', 'Nguyễn Thị Lan',     'lan.nguyen@example.vn',  '+84901234567', '1990-03-14', 'vang',      '2021-02-01 09:15+07'),
    (2, 'TV000102', 'Trần Văn Hùng',      'hung.tran@example.com',  '+84912345678', '1985-11-02', 'kim_cuong', '2020-07-19 18:40+07'),
    (3, 'TV000103', 'Lê Minh Châu',       'chau.le@example.com',    '+84903456789', '1996-06-30', 'bac',       '2022-05-05 12:00+07'),
    (4, 'TV000104', 'Phạm Thị Hồng Nhung','nhung.pham@example.vn',  '+84987654321', '1993-09-21', 'vang',      '2021-10-10 10:10+07'),
    (5, 'TV000105', 'Võ Quốc Khánh',      'khanh.vo@example.vn',    '+84935111222', '1979-01-08', 'bac',       '2023-01-15 08:05+07'),
    (6, 'TV000106', 'Đặng Thu Trang',     NULL,                     '+84978222333', '2000-12-24', 'bac',       '2024-03-08 19:30+07'),
    (7, 'TV000107', 'Bùi Đức Anh',        'anh.bui@example.com',    NULL,           NULL,         'bac',       '2024-08-20 14:45+07');
SELECT setval(pg_get_serial_sequence('members', 'id'), (SELECT max(id) FROM members));

INSERT INTO points_ledger (id, member_id, points, reason, at) VALUES
    (1, 1,   120, 'mua hàng HD-2023-000881',  '2023-04-02 10:00+07'),
    (2, 1,   300, 'mua hàng HD-2024-001207',  '2024-06-11 17:20+07'),
    (3, 1,  -200, 'đổi quà: bình giữ nhiệt',  '2024-07-01 09:00+07'),
    (4, 2,   950, 'mua hàng HD-2024-000312',  '2024-02-14 20:05+07'),
    (5, 2,  -500, 'đổi quà: voucher 500.000đ','2024-03-01 11:30+07'),
    (6, 3,    45, 'mua hàng HD-2025-000077',  '2025-01-09 15:45+07'),
    (7, 4,    80, 'sinh nhật thành viên',     '2024-09-21 00:05+07'),
    (8, 5,    60, 'mua hàng HD-2025-000150',  '2025-02-03 08:30+07');
SELECT setval(pg_get_serial_sequence('points_ledger', 'id'), (SELECT max(id) FROM points_ledger));

INSERT INTO redemptions (member_id, ledger_entry_id, reward, recipient_name, recipient_phone, delivery_address, redeemed_at) VALUES
    (1, 3, 'Bình giữ nhiệt 500ml', 'Nguyễn Thị Lan', '+84901234567',
     '12 Ngõ 34 Nguyên Hồng, Phường Láng Hạ, Quận Đống Đa, Hà Nội', '2024-07-01 09:00+07'),
    (2, 5, 'Voucher mua sắm 500.000đ', 'Trần Văn Hùng', '+84912345678', NULL, '2024-03-01 11:30+07');

INSERT INTO member_notes (member_id, body, written_by, created_at) VALUES
    (1, 'Khách báo thẻ thành viên bị mất, đã cấp lại thẻ mới tại quầy.', 'quay_dich_vu_01', '2023-05-20 16:00+07'),
    (1, 'Khách muốn nhận ưu đãi sinh nhật qua Zalo.', 'tong_dai_02', '2024-03-02 09:12+07'),
    (2, 'Khách hạng Kim Cương, ưu tiên giao hàng nhanh.', 'quay_dich_vu_01', '2024-02-15 10:00+07'),
    (4, 'Khách hỏi về chính sách bảo mật dữ liệu cá nhân.', 'tong_dai_02', '2024-10-01 14:30+07');

INSERT INTO purchases (member_id, invoice_no, store, amount_vnd, buyer_name, points_earned, purchased_at) VALUES
    (1, 'HD-2023-000881', 'Cửa hàng Cầu Giấy, Hà Nội',      1200000, 'Nguyễn Thị Lan', 120, '2023-04-02 10:00+07'),
    (1, 'HD-2024-001207', 'Cửa hàng Đống Đa, Hà Nội',       3000000, 'Nguyễn Thị Lan', 300, '2024-06-11 17:20+07'),
    (2, 'HD-2024-000312', 'Cửa hàng Quận 1, TP. Hồ Chí Minh', 9500000, 'Trần Văn Hùng',  950, '2024-02-14 20:05+07'),
    (3, 'HD-2025-000077', 'Cửa hàng Hải Châu, Đà Nẵng',      450000, 'Lê Minh Châu',    45, '2025-01-09 15:45+07'),
    (5, 'HD-2025-000150', 'Cửa hàng Thủ Đức, TP. Hồ Chí Minh', 600000, 'Võ Quốc Khánh',  60, '2025-02-03 08:30+07');
